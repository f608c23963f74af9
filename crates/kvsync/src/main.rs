//! The `kvsync` binary: everything is in the library (`kvsync::cli`).

fn main() -> anyhow::Result<()> {
    kvsync::cli::main()
}
