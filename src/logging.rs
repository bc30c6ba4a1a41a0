//! Logging: `tracing` to stderr. Under systemd (stderr is the journal, `$JOURNAL_STREAM` set)
//! each line starts with its syslog priority (`<3>` error … `<7>` debug) and no timestamp, so
//! `journalctl -p warning` filters as expected; on a terminal, colours; elsewhere, plain text.
//! Secrets never reach a log line: the HTTP and TLS crates, whose debug output holds raw
//! requests, are capped at info whatever `RUST_LOG` says.

use std::fmt;
use std::io::IsTerminal;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Crates whose debug output would contain secrets (request headers and bodies).
const QUIET_TARGETS: &[&str] = &[
    "ureq",
    "ureq_proto",
    "rustls",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "gix_transport",
    "gix_protocol",
    "gix_credentials",
];

/// The level comes from `RUST_LOG`, else the config's `log_level`, else warnings only.
pub fn init(config_level: Option<&str>) {
    // The scheduler crate narrates its own start-up at info level: keep it to warnings.
    let level = config_level.unwrap_or("warn");
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::try_new(format!("{level},tokio_cron_scheduler=warn"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    });
    let directives = QUIET_TARGETS.iter().map(|t| format!("{t}=info")).chain(["tokio_cron_scheduler=warn".to_string()]);
    for directive in directives {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journal && std::io::stderr().is_terminal();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(move || SafeStderr { ansi }).with_target(false);
    let _ = if journal {
        let format =
            JournalPriority(tracing_subscriber::fmt::format().without_time().with_target(false).with_ansi(false));
        builder.event_format(format).try_init()
    } else {
        builder.with_ansi(ansi).try_init()
    };
}

/// Stderr for log lines, with the control characters of logged values (a policy or author
/// name, a remote's message) escaped: one log line stays one line and cannot drive the
/// terminal. The formatter's own colour codes are kept when colours are on.
struct SafeStderr {
    ansi: bool,
}

impl std::io::Write for SafeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter writes one whole event per call; its final line break stays.
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (text.as_ref(), ""),
        };
        let safe = if self.ansi {
            crate::text::escape_controls_keeping_colours(body)
        } else {
            crate::text::escape_controls(body)
        };
        let mut out = std::io::stderr().lock();
        out.write_all(safe.as_bytes())?;
        out.write_all(end.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Prefixes each line with its syslog priority for journald.
struct JournalPriority(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalPriority
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
