//! The `licensor` binary: the CLI, and nothing else.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    licensor::cli::main()
}
