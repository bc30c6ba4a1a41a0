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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        let format =
            JournalPriority(tracing_subscriber::fmt::format().without_time().with_target(false).with_ansi(false));
        builder.event_format(format).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
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
