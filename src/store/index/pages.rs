//! Pages and counts read through the lists: keyset pages (strictly older than a [`Position`]),
//! offset pages, and counts, each through the most selective list for the query.
//!
//! Invariant: when the chosen list alone decides every filter, an event is read only to be
//! shown; otherwise each candidate is read and checked against the whole query.

use super::super::blocks::{self, Entry};
use super::super::{EventQuery, Store, StoreError};
use super::TIME_LEN;
use crate::event::AuditEvent;

/// Where a page starts: strictly older than this (created_at, seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub created_at: String,
    pub seq: u64,
}

impl Position {
    /// `2024-03-01T10:00:00.000Z~17`, as it travels in URLs.
    pub fn encode(&self) -> String {
        format!("{}~{}", self.created_at, self.seq)
    }

    pub fn decode(text: &str) -> Option<Position> {
        let (at, seq) = text.rsplit_once('~')?;
        (at.len() == TIME_LEN && at.is_ascii() && blocks::time_of(at).is_some()).then_some(())?;
        Some(Position { created_at: at.to_string(), seq: seq.parse().ok()? })
    }
}

/// One page of matching events, newest first: decoded ([`AuditEvent`]) for the page, as stored
/// ([`StoredEvent`]) for the API.
#[derive(Debug)]
pub struct Page<T = AuditEvent> {
    pub events: Vec<(u64, T)>,
    /// Where the next (older) page starts, when there is one.
    pub next: Option<Position>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page { events: Vec::new(), next: None }
    }
}

/// An event as stored: its JSON, as streamed and chained (the API serves these bytes as they
/// are); [`Store::read_stored`] reads the fields a reader needs without decoding the rest.
#[derive(Debug)]
pub struct StoredEvent {
    pub json: sled::IVec,
}

impl EventQuery {
    /// `since` and `until` as entry bounds: [low, high). They are RFC 3339 with milliseconds,
    /// as `app::events::time_bound` makes them.
    pub(in crate::store) fn span(&self) -> Result<(Option<Entry>, Option<Entry>), StoreError> {
        let time =
            |text: &str| blocks::time_of(text).ok_or_else(|| StoreError::BadQuery(format!("{text:?} is not a time")));
        let low = self.since.as_deref().map(time).transpose()?.map(|t| blocks::entry(t, 0));
        let high = self.until.as_deref().map(time).transpose()?.map(|t| blocks::entry(t.saturating_add(1), 0));
        Ok((low, high))
    }
}

impl Store {
    /// The entries of the best list for `q` between `q.since`, `q.until` and `before`, newest
    /// first.
    fn index_range<'a>(
        &'a self,
        q: &EventQuery,
        before: Option<&Position>,
    ) -> Result<impl Iterator<Item = Result<Entry, StoreError>> + use<'a>, StoreError> {
        let (low, mut high) = q.span()?;
        if let Some(pos) = before {
            let time = blocks::time_of(&pos.created_at)
                .ok_or_else(|| StoreError::BadQuery(format!("{:?} is not a time", pos.created_at)))?;
            let at = blocks::entry(time, pos.seq);
            high = Some(high.map_or(at, |h| h.min(at)));
        }
        Ok(self.list_range(&self.best_list(q), (low, high), true))
    }

    /// Up to `limit` matching events older than `before` (all when None), newest first, read
    /// through the most selective index; skips the first `skip` matches (offset pagination).
    pub fn page(&self, q: &EventQuery, before: Option<&Position>, skip: usize, limit: usize) -> anyhow::Result<Page> {
        Ok(self.page_of(q, before, skip, limit, |seq| self.event_at(seq), |e| Ok(q.matches(e)))?)
    }

    /// [`Store::page`] with the events as stored, for answers that send them as they are.
    pub fn page_stored(
        &self,
        q: &EventQuery,
        before: Option<&Position>,
        skip: usize,
        limit: usize,
    ) -> anyhow::Result<Page<StoredEvent>> {
        let matches = |e: &StoredEvent| {
            let event: AuditEvent = super::super::records::decode(&self.dir, "events", &e.json, || "an event".into())?;
            Ok(q.matches(&event))
        };
        Ok(self.page_of(q, before, skip, limit, |seq| self.stored_event_at(seq), matches)?)
    }

    /// The fields `T` names of a stored event, borrowed from its JSON where they can be.
    pub fn read_stored<'a, T: serde::Deserialize<'a>>(&self, seq: u64, e: &'a StoredEvent) -> Result<T, StoreError> {
        self.decode_json(seq, &e.json)
    }

    pub(super) fn stored_event_at(&self, seq: u64) -> Result<StoredEvent, StoreError> {
        Ok(StoredEvent { json: self.event_json_at(seq)? })
    }

    /// A page of the events `read` returns, through the most selective index. When the index
    /// alone decides the filters, skipped events and the one that tells whether a next page
    /// exists are not even read.
    fn page_of<T>(
        &self,
        q: &EventQuery,
        before: Option<&Position>,
        skip: usize,
        limit: usize,
        read: impl Fn(u64) -> Result<T, StoreError>,
        matches: impl Fn(&T) -> Result<bool, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        let exact = q.is_answered_by_index();
        let mut page = Page::default();
        let mut skipped = 0;
        let mut last: Option<Entry> = None;
        for item in self.index_range(q, before)? {
            let entry = item?;
            let seq = blocks::seq_of(&entry);
            let value = if exact {
                None
            } else {
                let value = read(seq)?;
                if !matches(&value)? {
                    continue;
                }
                Some(value)
            };
            if skipped < skip {
                skipped += 1;
                continue;
            }
            if page.events.len() == limit {
                if let Some(entry) = last {
                    let seq = blocks::seq_of(&entry);
                    let created_at = blocks::created_at_of(&entry).ok_or_else(|| StoreError::Damaged {
                        what: format!("the index entry of event #{seq} does not hold a time"),
                        location: format!("tree \"index\" in {}", self.dir.display()),
                    })?;
                    page.next = Some(Position { created_at, seq });
                }
                break;
            }
            let value = match value {
                Some(value) => value,
                None => read(seq)?,
            };
            last = Some(entry);
            page.events.push((seq, value));
        }
        Ok(page)
    }

    /// How many events match `q`, or None when more than `cap` do.
    pub fn count(&self, q: &EventQuery, cap: usize) -> anyhow::Result<Option<usize>> {
        if let Some(n) = self.counted(q)? {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            return Ok((n <= cap).then_some(n));
        }
        let exact = q.is_answered_by_index();
        let mut n = 0;
        for item in self.index_range(q, None)? {
            let seq = blocks::seq_of(&item?);
            if !exact && !q.matches(&self.event_at(seq)?) {
                continue;
            }
            n += 1;
            if n > cap {
                return Ok(None);
            }
        }
        Ok(Some(n))
    }
}

impl EventQuery {
    /// Whether the chosen index alone decides every filter: then counting needs no decoding,
    /// and a page reads only the events it shows.
    fn is_answered_by_index(&self) -> bool {
        let one_project_and_type = self.projects.len() <= 1 && self.event_types.len() <= 1;
        self.policy.is_none()
            && self.author_exact.is_none()
            && self.author.is_none()
            && self.authored_only.is_empty()
            && one_project_and_type
    }
}
