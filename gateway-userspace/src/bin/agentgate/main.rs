//! The `agentgate` binary: the daemon and its command line (DESIGN.md, "Command line").
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
