//! The `archiver` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    archiver::main()
}
