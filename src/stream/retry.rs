//! The retry policy, in one place (like vector's `RetryLogic`): every attempt's outcome becomes a
//! [`Decision`] with a reason, and backoff is capped exponential with full jitter. Pure: the
//! random source is passed in.

use rand::Rng;
use std::time::Duration;

/// What one attempt (an HTTP request or a JetStream publish) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// JetStream stored the event (`duplicate`: it already had this id).
    Acknowledged {
        duplicate: bool,
    },
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or reset, timeout, DNS, TLS, no publish acknowledgement.
    Transport {
        reason: String,
    },
    /// The request could not be built (bad URL), or the broker refused our credentials:
    /// retrying cannot help.
    Unsendable {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Success,
    Retry { reason: String, not_before: Option<Duration> },
    Dead { reason: String },
}

impl Outcome {
    /// The status code, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// 2xx and a JetStream acknowledgement succeed; 408, 429, 5xx and transport failures are retried; redirects are not followed
/// (a token must not travel to another host) and, like other 4xx, are dead.
pub fn decide(outcome: &Outcome) -> Decision {
    match outcome {
        Outcome::Status { code, .. } if (200..300).contains(code) => Decision::Success,
        Outcome::Acknowledged { .. } => Decision::Success,
        Outcome::Status { code, retry_after } if *code == 408 || *code == 429 || *code >= 500 => {
            Decision::Retry { reason: format!("HTTP {code}"), not_before: *retry_after }
        }
        Outcome::Status { code, .. } if (300..400).contains(code) => Decision::Dead {
            reason: format!("HTTP {code}: redirects are not followed (point the destination at the final URL)"),
        },
        Outcome::Status { code, .. } => {
            Decision::Dead { reason: format!("HTTP {code}: the receiver rejected the event") }
        }
        Outcome::Transport { reason } => Decision::Retry { reason: reason.clone(), not_before: None },
        Outcome::Unsendable { reason } => Decision::Dead { reason: reason.clone() },
    }
}

/// How long to wait before attempt number `attempts + 1`, having failed `attempts` times:
/// uniformly random in `[0, min(max, initial * 2^(attempts-1))]` ("full jitter"), but never
/// sooner than the receiver's `Retry-After`.
pub fn backoff(
    attempts: u32,
    initial: Duration,
    max: Duration,
    not_before: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let exp = initial.saturating_mul(1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(u32::MAX));
    let ceiling = exp.min(max);
    let jittered = Duration::from_millis(rng.random_range(0..=ceiling.as_millis().min(u64::MAX as u128) as u64));
    match not_before {
        Some(wait) => jittered.max(wait),
        None => jittered,
    }
}

/// `Retry-After` as seconds or an HTTP date, relative to `now` (unix ms).
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp().as_millisecond();
    Some(Duration::from_millis(at.saturating_sub(now_ms).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn status(code: u16) -> Outcome {
        Outcome::Status { code, retry_after: None }
    }

    #[test]
    fn decisions_follow_the_contract() {
        assert_eq!(decide(&status(200)), Decision::Success);
        assert_eq!(decide(&status(204)), Decision::Success);
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(decide(&status(code)), Decision::Retry { .. }), "{code}");
        }
        for code in [301, 302, 307, 400, 401, 403, 404, 413] {
            assert!(matches!(decide(&status(code)), Decision::Dead { .. }), "{code}");
        }
        assert!(matches!(decide(&Outcome::Transport { reason: "connection refused".into() }), Decision::Retry { .. }));
        let Decision::Dead { reason } = decide(&status(301)) else { panic!() };
        assert!(reason.contains("redirects are not followed"));
    }

    #[test]
    fn backoff_is_capped_full_jitter_and_respects_retry_after() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempts in 1..40 {
            let ceiling = Duration::from_secs(1u64 << (attempts - 1).min(20)).min(max);
            for _ in 0..50 {
                let d = backoff(attempts, initial, max, None, &mut rng);
                assert!(d <= ceiling, "attempt {attempts}: {d:?} > {ceiling:?}");
            }
        }
        let spread: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(6, initial, max, None, &mut rng).as_millis()).collect();
        assert!(spread.len() > 40, "jitter should spread delays");
        assert!(backoff(1, initial, max, Some(Duration::from_secs(30)), &mut rng) >= Duration::from_secs(30));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap().as_millisecond();
        let date = "Tue, 14 Nov 2023 22:13:40 GMT"; // now + 20 s
        assert_eq!(parse_retry_after(date, now), Some(Duration::from_secs(20)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
