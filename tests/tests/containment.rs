//! Containment on the real kernel: a tagged process tries every route out
//! other than the proxy; each is refused (a listener on the other side
//! confirms nothing arrived) and recorded, and the allowed routes still work.

use std::{
    io::{BufRead as _, BufReader},
    process::{ChildStdout, Stdio},
    sync::mpsc,
    time::Duration,
};

use agentgate_e2e::{DaemonOptions, Env, Proc, run_ok, scripts_dir};
use serde_json::Value;

/// The fake resolver the config names (inside the test's netns).
const RESOLVER: &str = "127.0.0.53";

fn options() -> DaemonOptions {
    DaemonOptions {
        extra: format!("\n[containment]\ndns_resolvers = [\"{RESOLVER}\"]\n"),
        ..DaemonOptions::default()
    }
}

/// The non-root agent's interpreter: /root (pyenv) is not readable by nobody.
const PYTHON: &str = "/usr/bin/python3";

/// Runs one probe in a tagged cgroup, as `user` (as root when `None`), and
/// returns its JSON line.
fn probe_as(env: &Env, user: Option<&str>, args: &[&str]) -> Value {
    let script = scripts_dir().join("probe.py");
    let mut command = vec![PYTHON, script.to_str().unwrap()];
    command.extend(args);
    let mut c = match user {
        Some(u) => env.exec_as(u, "demo", &command),
        None => env.exec("demo", &command),
    };
    let out = run_ok(&mut c).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a probe line")).unwrap()
}

fn probe(env: &Env, args: &[&str]) -> Value {
    probe_as(env, Some("nobody"), args)
}

/// The fake resolver and a datagram sink on IPv4 and IPv6, in the netns;
/// every datagram they receive comes out of the channel as JSON.
fn sink(env: &Env) -> (Proc, mpsc::Receiver<Value>) {
    let mut c = env.netns.command("python3");
    c.arg(scripts_dir().join("udp_sink.py"))
        .args([RESOLVER, "127.0.0.1:9999", "[::1]:9999"])
        .stdout(Stdio::piped());
    let mut p = Proc::spawn("udp sink", c).unwrap();
    assert_eq!(p.read_line().unwrap(), "ready");
    let out: ChildStdout = p.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    (p, rx)
}

fn records(env: &Env) -> Vec<Value> {
    env.audit_records().unwrap()
}

/// Refusal records (`containment.refused`) whose action matches `pred`.
fn refusals(env: &Env, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    records(env)
        .into_iter()
        .filter(|r| r["kind"] == "containment.refused" && pred(&r["action"]))
        .collect()
}

/// Polls until `f` holds (the daemon writes records from the event ring
/// shortly after the refusal).
fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never: {what}");
}

#[test]
fn datagrams_reach_only_the_resolver_through_the_logging_forwarder() {
    let env = Env::new("dgram", options()).unwrap();
    let (_sink, received) = sink(&env);

    // Refused: datagrams anywhere but the resolver, connected or not,
    // IPv4, IPv6 and IPv4-mapped, and port 53 of a host that is not a resolver.
    for args in [
        ["udp-sendto", "127.0.0.1", "9999"],
        ["udp-sendto", "::1", "9999"],
        ["udp-sendto", "::ffff:127.0.0.1", "9999"],
        ["udp-connect", "127.0.0.1", "9999"],
        ["udp-sendto", "127.0.0.9", "53"],
    ] {
        let r = probe(&env, &args);
        assert_eq!(r["ok"], false, "{args:?}: {r}");
        assert_eq!(r["error"], "EPERM", "{args:?}: {r}");
    }
    // Allowed: DNS to the resolver, connected and not; the answer comes
    // from the resolver's own address.
    for mode in ["dns", "dns-connected"] {
        let r = probe(&env, &[mode, RESOLVER, "db.example"]);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["answers"], 1, "{r}");
        assert_eq!(r["from"], format!("{RESOLVER}:53"), "{r}");
    }
    // A tunnel-shaped query (a 50-byte label) and a NULL query are refused
    // by the forwarder and never leave.
    let tunnel = format!("{}.t.example", "a".repeat(50));
    let r = probe(&env, &["dns", RESOLVER, &tunnel]);
    assert_eq!(r["rcode"], 5, "REFUSED: {r}");
    let r = probe(&env, &["dns", RESOLVER, "x.example", "10"]);
    assert_eq!(r["rcode"], 5, "REFUSED: {r}");

    // The other side saw exactly the two ordinary queries.
    std::thread::sleep(Duration::from_millis(300));
    let seen: Vec<Value> = received.try_iter().collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|d| d["name"] == "db.example"), "{seen:?}");

    // Every refusal is a record naming the agent and where it meant to go.
    eventually("five datagram refusals recorded", || {
        refusals(&env, |a| a["route"] == "datagram").len() == 5
    });
    let refused = refusals(&env, |a| a["route"] == "datagram");
    let dests: Vec<&str> = refused
        .iter()
        .map(|r| r["action"]["destination"].as_str().unwrap())
        .collect();
    for d in ["127.0.0.1:9999", "[::1]:9999", "127.0.0.9:53"] {
        assert!(dests.contains(&d), "{dests:?}");
    }
    for r in &refused {
        assert_eq!(r["identity"]["subject"], "demo");
        assert_eq!(r["workload"]["uid"], 65534);
        assert_eq!(r["decision"]["verdict"], "deny");
    }
    // Each query is a dns.query record: name, type, who; and its answer count.
    let all = records(&env);
    let asked: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "dns.query" && r["action"]["name"] == "db.example")
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    for q in &asked {
        assert_eq!(q["decision"]["verdict"], "allow");
        assert_eq!(q["action"]["type"], "A");
        assert_eq!(q["identity"]["subject"], "demo");
        assert_eq!(q["workload"]["uid"], 65534);
        assert!(
            q["workload"]["exe"]
                .as_str()
                .is_some_and(|e| e.contains("python3")),
            "{q}"
        );
        let id = &q["action"]["query"];
        assert!(
            all.iter().any(|r| r["kind"] == "dns.query"
                && r["action"]["query"] == *id
                && r["result"]["answers"] == 1),
            "answer count of {id}"
        );
    }
    let denied: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "dns.query" && r["decision"]["verdict"] == "deny")
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(
        denied
            .iter()
            .any(|r| r["decision"]["reason"].as_str().unwrap().contains("label")),
        "{denied:?}"
    );

    let s = env.status().unwrap();
    let c = &s["containment"];
    assert_eq!(c["refused"]["datagram"], 5, "{c}");
    assert_eq!(c["dns"]["forwarded"], 2, "{c}");
    assert_eq!(c["dns"]["refused"], 2, "{c}");
    assert_eq!(c["dns_resolvers"][0]["resolver"], format!("{RESOLVER}:53"));
    let text = String::from_utf8_lossy(&run_ok(&mut env.agentgate(&["status"])).unwrap().stdout)
        .into_owned();
    assert!(text.contains("containment:"), "{text}");
    assert!(
        text.contains(&format!("dns resolvers: {RESOLVER}:53")),
        "{text}"
    );
}

#[test]
fn socket_types_outside_tcp_and_udp_are_refused() {
    let env = Env::new("socktype", options()).unwrap();
    let (_echo, port) = env.echo_server("127.0.0.1").unwrap();
    let port = port.to_string();
    // MPTCP: refused at socket creation by the gateway's hook.
    let r = probe(&env, &["mptcp", "127.0.0.1", &port]);
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("EPERM")),
        "{r}"
    );
    // As root (where the kernel's own capability checks pass), raw sockets
    // are refused by the gateway too.
    for (family, ty, proto) in [("2", "3", "1"), ("2", "3", "255"), ("10", "3", "58")] {
        let r = probe_as(&env, None, &["socket", family, ty, proto]);
        assert_eq!(r["ok"], false, "{family}/{ty}/{proto}: {r}");
        assert_eq!(r["error"], "EPERM", "{family}/{ty}/{proto}: {r}");
    }
    // A non-root agent cannot make raw, packet or ICMP ("ping") sockets at
    // all: the kernel refuses them (CAP_NET_RAW, net.ipv4.ping_group_range)
    // before any hook runs.
    for (family, ty, proto) in [("2", "3", "1"), ("17", "3", "0"), ("2", "2", "1")] {
        let r = probe(&env, &["socket", family, ty, proto]);
        assert_eq!(r["ok"], false, "{family}/{ty}/{proto}: {r}");
    }
    // TCP and UDP sockets are still made.
    assert_eq!(probe(&env, &["socket", "2", "1", "0"])["ok"], true);
    assert_eq!(probe(&env, &["socket", "10", "2", "0"])["ok"], true);
    // Refused by the kernel hook (the packet socket above was refused by
    // the exec filter, before the kernel's own check: see the Unix test).
    let by_hook = || -> Vec<Value> {
        refusals(&env, |a| a["route"] == "socket")
            .into_iter()
            .filter(|r| r["decision"]["enforced_by"].is_null())
            .collect()
    };
    eventually("four socket refusals recorded", || by_hook().len() == 4);
    let protocols: Vec<Value> = by_hook()
        .iter()
        .map(|r| r["action"]["protocol"].clone())
        .collect();
    for p in ["mptcp", "icmp", "raw", "icmpv6"] {
        assert!(protocols.contains(&Value::from(p)), "{protocols:?}");
    }
    assert_eq!(
        env.status().unwrap()["containment"]["refused"]["socket_type"],
        4
    );
}

#[test]
fn tcp_fast_open_goes_through_the_proxy() {
    let env = Env::new("tfo", options()).unwrap();
    let (_echo, port) = env.echo_server("127.0.0.1").unwrap();
    let r = probe(&env, &["tcp-fastopen", "127.0.0.1", &port.to_string()]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["echoed"], "hello", "{r}");
    assert_eq!(r["peer"], serde_json::json!(["127.0.0.1", port]), "{r}");
    eventually("the connection is a record", || {
        records(&env).iter().any(|r| {
            r["kind"] == "connection.open"
                && r["workload"]["uid"] == 65534
                && r["resource"] == "loopback"
        })
    });
    assert_eq!(env.status().unwrap()["counters"]["redirected"], 1);
}

#[test]
fn a_root_agent_that_leaves_its_cgroup_is_recorded_and_killed() {
    let env = Env::new("escape", options()).unwrap();
    let mount = env.cgroup.path.parent().unwrap().to_path_buf();
    let marker = env.state.join("survived");
    // The agent moves itself to the cgroup root (untagged), then would go on.
    let script = format!(
        "echo $$ > {}/cgroup.procs && sleep 2 && touch {}",
        mount.display(),
        marker.display()
    );
    let out = env.exec("demo", &["sh", "-c", &script]).output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 9), "killed: {out:?}");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "the escaped agent ran on");
    let all = records(&env);
    let escaped: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "workload.escaped")
        .collect();
    assert_eq!(escaped.len(), 1, "{escaped:?}");
    let e = escaped[0];
    assert_eq!(e["identity"]["subject"], "demo");
    assert_eq!(e["action"]["to_cgroup"], "/");
    assert_eq!(e["result"]["killed"], true);
    assert!(all.iter().any(|r| r["kind"] == "workload.privileged"));
    let s = env.status().unwrap();
    assert_eq!(s["containment"]["escapes"]["escapes_detected"], 1);
    assert_eq!(s["containment"]["escapes"]["escapes_killed"], 1);

    // Moving into a cgroup below the tagged one is not leaving it.
    let script = format!(
        "o={mount}$(sed -n 's/^0:://p' /proc/self/cgroup) && mkdir $o/sub && echo $$ > $o/sub/cgroup.procs \
         && echo stayed && echo $$ > $o/cgroup.procs && rmdir $o/sub",
        mount = mount.display()
    );
    let out = env.exec("demo", &["sh", "-c", &script]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stayed");
    assert_eq!(
        env.status().unwrap()["containment"]["escapes"]["escapes_detected"],
        1
    );
}

/// Lines of the Postgres log that record a connection over its Unix socket.
fn local_connections(pg: &agentgate_e2e::pg::PgServer) -> usize {
    std::fs::read_to_string(pg.dir.join("postgres.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("connection received: host=[local]"))
        .count()
}

/// A real `PostgreSQL` whose socket anyone may reach (as /var/run/postgresql
/// is), logging each connection.
fn postgres_with_an_open_socket(env: &Env) -> agentgate_e2e::pg::PgServer {
    let pg = agentgate_e2e::pg::PgServer::start(&env.netns, 5432, false).unwrap();
    pg.admin_sql("ALTER SYSTEM SET log_connections = on")
        .unwrap();
    pg.admin_sql("SELECT pg_reload_conf()").unwrap();
    run_ok(std::process::Command::new("chmod").arg("0755").arg(&pg.dir)).unwrap();
    pg
}

#[test]
fn unix_sockets_are_refused_and_nothing_arrives() {
    let env = Env::new("unixfam", options()).unwrap();
    let pg = postgres_with_an_open_socket(&env);
    let socket = pg.dir.join(".s.PGSQL.5432");
    let socket = socket.to_str().unwrap();
    let psql = [
        "/usr/lib/postgresql/15/bin/psql",
        "-h",
        pg.dir.to_str().unwrap(),
        "-p",
        "5432",
        "-U",
        "postgres",
        "-Atc",
        "SELECT 1",
    ];
    // The route exists: an untagged non-root process reaches the server.
    std::thread::sleep(Duration::from_millis(200));
    let before = local_connections(&pg);
    let out = env
        .netns
        .command("runuser")
        .args(["-u", "nobody", "--"])
        .args(psql)
        .env("PGPASSWORD", agentgate_e2e::pg::PASSWORD)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        local_connections(&pg),
        before + 1,
        "the server logs local connections"
    );

    // A tagged agent does not get there: psql, and a raw connect.
    let out = env
        .exec_as("nobody", "demo", &psql)
        .env("PGPASSWORD", agentgate_e2e::pg::PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    let r = probe(&env, &["unix-connect", socket]);
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("EPERM")),
        "{r}"
    );
    let r = probe(&env, &["unix-pair-reconnect", socket]);
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("EPERM")),
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        local_connections(&pg),
        before + 1,
        "nothing arrived from the agent"
    );

    // An abstract-namespace listener: reachable untagged, not tagged.
    let name = format!("agentgate-{}", env.name);
    let listener = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ns.bind('\\0{name}')\ns.listen()\nprint('ready',flush=True)\n\
         while True:\n  c,_=s.accept()\n  print('accepted',flush=True)\n  c.close()\n"
    );
    let mut c = env.netns.command("python3");
    c.args(["-c", &listener]).stdout(Stdio::piped());
    let mut abstract_srv = Proc::spawn("abstract listener", c).unwrap();
    assert_eq!(abstract_srv.read_line().unwrap(), "ready");
    let at = format!("@{name}");
    let r = probe(&env, &["unix-connect", &at]);
    assert_eq!(r["error"], "EPERM", "{r}");
    let untagged = env
        .netns
        .command(PYTHON)
        .arg(scripts_dir().join("probe.py"))
        .args(["unix-connect", &at])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&untagged.stdout).contains("\"ok\": true"),
        "{untagged:?}"
    );
    assert_eq!(
        abstract_srv.read_line().unwrap(),
        "accepted",
        "the untagged connect arrived"
    );

    // Every refusal is on record, with who and what.
    let refused = refusals(&env, |a| a["route"] == "socket" && a["family"] == "unix");
    assert!(refused.len() >= 4, "{refused:?}");
    for r in &refused {
        assert_eq!(r["identity"]["subject"], "demo", "{r}");
        assert_eq!(r["workload"]["uid"], 65534, "{r}");
        assert_eq!(r["decision"]["enforced_by"], "seccomp", "{r}");
    }
}

#[test]
fn other_socket_families_and_io_uring_are_refused_and_recorded() {
    let env = Env::new("families", options()).unwrap();
    // Other families and io_uring.
    for (args, what) in [
        (vec!["socket", "40", "1", "0"], "vsock"),
        (vec!["socket", "17", "3", "0"], "packet"),
        (vec!["socket", "16", "3", "9"], "netlink audit"),
        (vec!["io-uring"], "io_uring"),
    ] {
        let r = probe(&env, &args);
        assert_eq!(r["error"], "EPERM", "{what}: {r}");
    }
    // What agents need still works: route netlink, socketpair, TCP, UDP.
    assert_eq!(probe(&env, &["socket", "16", "3", "0"])["ok"], true);
    let out = run_ok(&mut env.exec_as("nobody", "demo", &[
        PYTHON, "-c",
        "import socket,asyncio; a,b=socket.socketpair(); a.send(b'x'); assert b.recv(1)==b'x'; asyncio.run(asyncio.sleep(0)); print('ok')",
    ]))
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let refused = refusals(&env, |a| a["route"] == "socket" || a["route"] == "io_uring");
    let families: Vec<&str> = refused
        .iter()
        .filter_map(|r| r["action"]["family"].as_str())
        .collect();
    for f in ["vsock", "packet", "netlink"] {
        assert!(families.contains(&f), "{f}: {families:?}");
    }
    assert!(refused.iter().any(|r| r["action"]["route"] == "io_uring"));
    for r in &refused {
        assert_eq!(r["identity"]["subject"], "demo", "{r}");
        assert_eq!(r["workload"]["uid"], 65534, "{r}");
    }
    let s = env.status().unwrap();
    assert_eq!(s["containment"]["refused"]["exec_filter"], 4, "{s}");
}

#[test]
fn nothing_dials_in_to_a_tagged_listener_from_another_host() {
    let env = Env::new("inbound", options()).unwrap();
    // Another host: a second network namespace on a veth pair.
    let outside = agentgate_e2e::Netns::new(&format!("{}o", env.name)).unwrap();
    let tag = std::process::id() % 100_000;
    let (here, there) = (format!("agi{tag}"), format!("ago{tag}"));
    for cmd in [
        format!("ip link add {here} type veth peer name {there}"),
        format!("ip link set {here} netns {}", env.netns.name),
        format!("ip link set {there} netns {}", outside.name),
        format!("ip -n {} addr add 10.231.0.1/24 dev {here}", env.netns.name),
        format!("ip -n {} addr add 10.231.0.2/24 dev {there}", outside.name),
        format!("ip -n {} link set {here} up", env.netns.name),
        format!("ip -n {} link set {there} up", outside.name),
    ] {
        run_ok(std::process::Command::new("sh").args(["-c", &cmd])).unwrap();
    }
    let listen = |port: u16| {
        format!(
            "import socket\ns=socket.socket()\ns.bind(('0.0.0.0',{port}))\ns.listen()\ns.settimeout(4)\n\
             print('listening',flush=True)\n\
             try:\n  c,a=s.accept()\n  print('accepted',a[0],flush=True)\nexcept TimeoutError:\n  print('nothing',flush=True)\n"
        )
    };
    let dial = |port: u16| {
        let code = format!(
            "import socket\ntry:\n  socket.create_connection(('10.231.0.1',{port}),timeout=2)\n  print('connected')\nexcept OSError as e:\n  print('failed',e)\n"
        );
        let out = outside
            .command(PYTHON)
            .args(["-c", &code])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // An untagged listener is reachable from the other host (the link works) ...
    let mut c = env.netns.command(PYTHON);
    c.args(["-c", &listen(7001)]).stdout(Stdio::piped());
    let mut untagged = Proc::spawn("untagged listener", c).unwrap();
    assert_eq!(untagged.read_line().unwrap(), "listening");
    assert_eq!(dial(7001), "connected");
    assert_eq!(untagged.read_line().unwrap(), "accepted 10.231.0.2");
    // ... a tagged agent's is not: nothing arrives.
    let mut c = env.exec_as("nobody", "demo", &[PYTHON, "-c", &listen(7002)]);
    c.stdout(Stdio::piped());
    let mut tagged = Proc::spawn("tagged listener", c).unwrap();
    assert_eq!(tagged.read_line().unwrap(), "listening");
    assert!(
        dial(7002).starts_with("failed"),
        "dialed in to a tagged listener"
    );
    assert_eq!(tagged.read_line().unwrap(), "nothing");
    eventually("the inbound refusal is recorded", || {
        !refusals(&env, |a| {
            a["route"] == "inbound" && a["source"] == "10.231.0.2"
        })
        .is_empty()
    });
    let r = &refusals(&env, |a| a["route"] == "inbound")[0];
    assert_eq!(r["identity"]["subject"], "demo", "{r}");
    assert!(
        env.status().unwrap()["containment"]["refused"]["inbound"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[test]
fn an_agent_cannot_drive_untagged_processes_of_its_own_user() {
    let env = Env::new("ptrace", options()).unwrap();
    // An untagged process of the same user (a shell of that user, say).
    let mut c = env.netns.command("setpriv");
    c.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "sleep",
        "60",
    ]);
    let victim = Proc::spawn("untagged process of nobody", c).unwrap();
    let pid = victim.pid().to_string();
    std::thread::sleep(Duration::from_millis(200));
    // Untagged, nobody may ptrace it (no Yama here): the route exists ...
    let out = env
        .netns
        .command("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            PYTHON,
        ])
        .arg(scripts_dir().join("probe.py"))
        .args(["ptrace", &pid])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\": true"),
        "{out:?}"
    );
    // ... a tagged agent of the same user may not (its Landlock domain).
    let r = probe(&env, &["ptrace", &pid]);
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("EPERM")),
        "{r}"
    );
}
