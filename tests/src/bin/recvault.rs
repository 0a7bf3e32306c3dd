//! `recvault`: the client CLI and one-command dev runner.
//! Freed memory is wiped (see `recvault_runtime::alloc`).

#[global_allocator]
static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;

fn main() -> std::process::ExitCode {
    recvault_tests::cli::main()
}
