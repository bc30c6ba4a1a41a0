//! The one clock of the program, passed in wherever behaviour depends on time (when an event
//! was detected, when a delivery is due, when a cache entry expires), so that tests control
//! time instead of sleeping.

pub trait Clock: Send + Sync {
    fn now(&self) -> jiff::Timestamp;

    /// Unix milliseconds.
    fn now_ms(&self) -> i64 {
        self.now().as_millisecond()
    }
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }
}
