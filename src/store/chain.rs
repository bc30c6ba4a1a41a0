//! The tamper-evident chain over the stored events: link(n) = SHA-256(link(n-1) || bytes(n)),
//! where bytes(n) are event n's canonical (streamed) JSON bytes — stored compressed since
//! `body` (the links are over the JSON, so heads from before compression still match) — and
//! link(-1) is 32 zero bytes.
//! Links are written in the transaction that stores their event, in its stored body (see
//! `body::LINKED_V1`; events stored before that have theirs in the `chain` tree); `verify`
//! recomputes them.
//!
//! What it proves: any change, removal or reordering of stored events is found by `verify`,
//! unless the chain was recomputed from that point on. Such a rewrite, and removing the newest
//! events, change the chain head — which `status` shows and the daemon logs after every
//! reconcile, so it can be compared with a copy kept elsewhere (the journal, a SIEM).

use super::{Store, StoreError, records::decode_link};
use anyhow::Result;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const GENESIS: [u8; 32] = [0; 32];

pub fn link(previous: &[u8; 32], event_bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(previous);
    h.update(event_bytes);
    h.finalize().into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn to_link(dir: &std::path::Path, bytes: &[u8], what: impl Fn() -> String) -> Result<[u8; 32], StoreError> {
    decode_link(dir, "meta", bytes, what)
}

/// The newest link and how many events it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    pub events: u64,
    pub head: String,
}

/// The first place where the stored trail does not match its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Break {
    /// Event `seq` is gone.
    Removed { seq: u64 },
    /// Event `seq`'s bytes are not the ones that were chained.
    Altered { seq: u64, id: String },
    /// Event `seq` holds the bytes chained at `seq + 1`: events were swapped.
    Reordered { seq: u64, id: String },
    /// Event `seq` has no link.
    Unlinked { seq: u64 },
    /// The recorded head is not the last link: the newest events were removed, or the head
    /// was rewritten.
    HeadMismatch { recorded: String, computed: String },
    /// Events stored beyond the recorded end of the trail.
    Extra { seq: u64 },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Removed { seq } => write!(f, "event #{seq} was removed"),
            Break::Altered { seq, id } => write!(f, "event #{seq} (id {id}) was altered"),
            Break::Reordered { seq, id } => write!(f, "event #{seq} (id {id}) is out of order: events were reordered"),
            Break::Unlinked { seq } => write!(f, "event #{seq} has no chain link"),
            Break::HeadMismatch { recorded, computed } => write!(
                f,
                "the recorded chain head {recorded} is not the last link {computed}: the newest events were removed or the head was rewritten"
            ),
            Break::Extra { seq } => write!(f, "event #{seq} lies beyond the recorded end of the trail"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub events: u64,
    pub head: String,
    pub first_break: Option<Break>,
}

impl Store {
    /// The chain link of event `seq` and of the one before it (genesis for the first), hex.
    pub fn chain_links(&self, seq: u64) -> anyhow::Result<(Option<String>, String)> {
        let link = |s: u64| -> anyhow::Result<Option<String>> {
            let Some(stored) = self.stored_body(s)? else { return Ok(None) };
            Ok(self.stored_link(s, &stored)?.map(|l| hex(&l)))
        };
        let previous = match seq.checked_sub(1) {
            Some(p) => link(p)?.unwrap_or_default(),
            None => hex(&GENESIS),
        };
        Ok((link(seq)?, previous))
    }

    pub fn chain_head(&self) -> Result<ChainHead> {
        Ok(ChainHead { events: self.next_seq()?, head: hex(&self.recorded_head()?) })
    }

    /// How many events the trail held when its chain head was `head` (hex): Some(0) for the
    /// empty trail's head, None when no link of this trail is `head` (the trail was lost,
    /// reset or rewritten since that head was recorded).
    pub fn events_at_head(&self, head: &str) -> Result<Option<u64>> {
        let head = head.trim().to_ascii_lowercase();
        if head == hex(&GENESIS) {
            return Ok(Some(0));
        }
        for entry in self.bodies_from(0) {
            let (seq, stored) = entry?;
            if self.stored_link(seq, &stored)?.is_some_and(|link| hex(&link) == head) {
                return Ok(Some(seq + 1));
            }
        }
        Ok(None)
    }

    /// The chain link of event `seq`, whose stored body is `stored`: in the body (see
    /// `body::LINKED_V1`), or for events stored before that and plain bodies in the chain tree.
    pub(super) fn stored_link(&self, seq: u64, stored: &[u8]) -> Result<Option<[u8; 32]>, StoreError> {
        let what = || format!("the chain link of event #{seq}");
        match super::body::link(stored) {
            Some(Ok(link)) => Ok(Some(link)),
            Some(Err(cut)) => decode_link(&self.dir, self.body_tree(seq), cut, what).map(Some),
            None => match self.chain.get(seq.to_be_bytes()).map_err(|e| self.sled(e))? {
                Some(link) => decode_link(&self.dir, "chain", &link, what).map(Some),
                None => Ok(None),
            },
        }
    }

    /// Recomputes the chain over every stored event and reports the first break.
    pub fn verify_chain(&self) -> Result<Verification> {
        let recorded = self.chain_head()?;
        let mut previous = GENESIS;
        let result =
            |first_break| Ok(Verification { events: recorded.events, head: recorded.head.clone(), first_break });
        // A body that no longer decodes was altered too: its link cannot match.
        let json = |seq: u64, stored: &[u8]| self.event_json(seq, stored).map(|j| j.into_owned()).unwrap_or_default();
        for seq in 0..recorded.events {
            let Some(stored_body) = self.stored_body(seq)? else {
                return result(Some(Break::Removed { seq }));
            };
            let bytes = json(seq, &stored_body);
            let Some(stored) = self.stored_link(seq, &stored_body)? else {
                return result(Some(Break::Unlinked { seq }));
            };
            if bytes.is_empty() || link(&previous, &bytes) != stored {
                let id = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                    .unwrap_or_default();
                // The next body chains on from here: with the link at this place (chain tree),
                // or with the link it carries.
                let swapped = match self.stored_body(seq + 1)? {
                    Some(next) => {
                        let candidate = link(&previous, &json(seq + 1, &next));
                        candidate == stored || self.stored_link(seq + 1, &next).ok().flatten() == Some(candidate)
                    }
                    None => false,
                };
                return result(Some(if swapped { Break::Reordered { seq, id } } else { Break::Altered { seq, id } }));
            }
            previous = stored;
        }
        if self.stored_body(recorded.events)?.is_some() {
            return result(Some(Break::Extra { seq: recorded.events }));
        }
        if hex(&previous) != recorded.head {
            return result(Some(Break::HeadMismatch { recorded: recorded.head.clone(), computed: hex(&previous) }));
        }
        result(None)
    }
}
