//! `recvault`: the client CLI and one-command dev runner.

fn main() -> std::process::ExitCode {
    recvault_tests::cli::main()
}
