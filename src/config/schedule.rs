//! `schedule` and `timezone`: a cron expression normalised to the six or seven fields (seconds
//! first) the scheduler runs, and an IANA time zone.

use super::Checker;
use toml::Spanned;

pub const DEFAULT_SCHEDULE: &str = "0 */5 * * * *";

impl Checker<'_> {
    pub(super) fn schedule(&mut self, raw: &Option<Spanned<String>>) -> String {
        match raw {
            None => DEFAULT_SCHEDULE.to_string(),
            Some(s) => match normalize_cron(s.get_ref()) {
                Ok(cron) => cron,
                Err(e) => {
                    self.error_at(s, format!("`schedule` = {:?} is not a valid cron expression: {e}", s.get_ref()));
                    String::new()
                }
            },
        }
    }

    pub(super) fn timezone(&mut self, raw: &Option<Spanned<String>>) -> chrono_tz::Tz {
        match raw {
            None => chrono_tz::UTC,
            Some(tz) => tz.get_ref().parse().unwrap_or_else(|_| {
                self.error_at(
                    tz,
                    format!(
                        "`timezone` = {:?} is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\")",
                        tz.get_ref()
                    ),
                );
                chrono_tz::UTC
            }),
        }
    }
}

/// Accepts 5-field cron (minute first) by adding a `0` seconds field; validates with the parser
/// tokio-cron-scheduler uses, so what passes here also schedules.
pub fn normalize_cron(expr: &str) -> Result<String, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 | 7 => fields.join(" "),
        n => return Err(format!("expected 5, 6 or 7 fields, found {n}")),
    };
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(&six)
        .map_err(|e| e.to_string())?;
    Ok(six)
}
