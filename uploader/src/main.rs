//! `uploaderd`: turn off core dumps before any credential is leased, then hand over to the library.
//! Freed memory is wiped (see `recvault_runtime::alloc`).

#[global_allocator]
static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;

fn main() -> std::process::ExitCode {
    if let Err(error) = recvault_runtime::hardening::disable_core_dumps() {
        eprintln!("uploaderd: cannot disable core dumps ({error}); refusing to start");
        return std::process::ExitCode::FAILURE;
    }
    recvault_uploader::cli::main()
}
