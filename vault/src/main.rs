//! `vaultd`: turn off core dumps before any key is touched, then hand over to the library.
//! Freed memory is wiped (see `recvault_runtime::alloc`).

#[global_allocator]
static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;

fn main() -> std::process::ExitCode {
    if let Err(error) = recvault_runtime::hardening::disable_core_dumps() {
        eprintln!(
            "vaultd: cannot disable core dumps ({error}); refusing to start with the master key"
        );
        return std::process::ExitCode::FAILURE;
    }
    recvault_vault::cli::main()
}
