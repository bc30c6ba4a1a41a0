//! Entry point: parse arguments, set up logging, run the command, map the outcome to an exit
//! code (0 success, 1 something the command covered failed, 2 unusable input).
//!
//! Output errors are errors: a full disk or a broken file descriptor ends the command with a
//! message and exit 1. Only a closed pipe (`policy-audit events | head`) counts as success.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = policy_audit::cli::parse_args();
    let stdout = std::io::stdout();
    let mut stdout = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut output = policy_audit::cli::run(cli, &mut stdout);
    let written = stdout.write_all(output.stdout.as_bytes()).and_then(|()| stdout.flush());
    if let Err(e) = written {
        let failed = policy_audit::app::write_failed(&e);
        output.stderr.push_str(&failed.stderr);
        output.code = output.code.max(failed.code);
    }
    // Nothing more can be said if stderr itself cannot be written.
    let _ = std::io::stderr().write_all(output.stderr.as_bytes());
    ExitCode::from(output.code)
}
