//! Harness for agentgate's end-to-end tests: each test gets its own cgroup,
//! network namespace and state directory, removed by Drop guards.
