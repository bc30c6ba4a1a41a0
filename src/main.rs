//! Entry point: parse arguments, set up logging, run the command, map the outcome to an exit
//! code (0 success, 1 something the command covered failed, 2 unusable input).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = policy_audit::cli::parse_args();
    let output = policy_audit::cli::run(cli);
    // A closed pipe (`policy-audit events | head`) is not an error.
    let _ = std::io::stdout().write_all(output.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(output.stderr.as_bytes());
    ExitCode::from(output.code)
}
