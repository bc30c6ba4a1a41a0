//! Decoding stored records. Every failure is [`StoreError::Damaged`] naming the record and
//! where it lives: nothing read from the database is ever replaced by a default.

use super::{CHAIN_HEAD, Delivery, NEXT_SEQ, Store, StoreError, chain};
use std::path::Path;

fn damaged(dir: &Path, tree: &str, what: String) -> StoreError {
    StoreError::Damaged { what, location: format!("tree {tree:?} in {}", dir.display()) }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    dir: &Path,
    tree: &str,
    bytes: &[u8],
    what: impl Fn() -> String,
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| damaged(dir, tree, format!("{} does not decode ({e})", what())))
}

pub(super) fn decode_u64(dir: &Path, tree: &str, bytes: &[u8], what: impl Fn() -> String) -> Result<u64, StoreError> {
    let array: [u8; 8] =
        bytes.try_into().map_err(|_| damaged(dir, tree, format!("{} is {} bytes long, not 8", what(), bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

pub(super) fn decode_link(
    dir: &Path,
    tree: &str,
    bytes: &[u8],
    what: impl Fn() -> String,
) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| damaged(dir, tree, format!("{} is {} bytes long, not 32", what(), bytes.len())))
}

impl Store {
    /// The sequence number the next stored event gets (= how many events the trail has).
    pub(super) fn next_seq(&self) -> Result<u64, StoreError> {
        match self.meta.get(NEXT_SEQ).map_err(|source| self.sled(source))? {
            Some(v) => decode_u64(&self.dir, "meta", &v, || "the event counter (next_seq)".into()),
            None => Ok(0),
        }
    }

    /// The newest chain link as recorded (genesis for an empty trail).
    pub(super) fn recorded_head(&self) -> Result<[u8; 32], StoreError> {
        match self.meta.get(CHAIN_HEAD).map_err(|source| self.sled(source))? {
            Some(v) => decode_link(&self.dir, "meta", &v, || "the chain head (chain_head)".into()),
            None if self.next_seq()? > 0 => Err(damaged(
                &self.dir,
                "meta",
                "the chain head (chain_head) is missing although events are stored".into(),
            )),
            None => Ok(chain::GENESIS),
        }
    }

    /// The canonical JSON of event `seq` from its stored body (see `body`): the one way every
    /// reader of event bytes (queries, export, server, delivery, replica, verify) gets them.
    pub(super) fn event_json<'a>(&self, seq: u64, stored: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, StoreError> {
        super::body::decode(stored)
            .map_err(|why| self.damaged_body(seq, format!("event #{seq} does not decode ({why})")))
    }

    /// [`Store::event_json`] of a body read from the tree, without a copy when it is plain JSON.
    pub(super) fn event_json_ivec(&self, seq: u64, stored: sled::IVec) -> Result<sled::IVec, StoreError> {
        Ok(match self.event_json(seq, &stored)? {
            std::borrow::Cow::Borrowed(_) => stored,
            std::borrow::Cow::Owned(json) => json.into(),
        })
    }

    /// Event `seq` (or the part of it `T` reads) from its stored body.
    pub(super) fn decode_event<T: serde::de::DeserializeOwned>(
        &self,
        seq: u64,
        stored: &[u8],
    ) -> Result<T, StoreError> {
        self.decode_json(seq, &self.event_json(seq, stored)?)
    }

    /// Event `seq` (or the part of it `T` reads) from its JSON; where it is kept is looked up
    /// only for the error.
    pub(super) fn decode_json<'a, T: serde::Deserialize<'a>>(&self, seq: u64, json: &'a [u8]) -> Result<T, StoreError> {
        serde_json::from_slice(json).map_err(|e| self.damaged_body(seq, format!("event #{seq} does not decode ({e})")))
    }

    pub(super) fn decode_delivery(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<Delivery, StoreError> {
        decode(&self.dir, tree, value, || format!("delivery {}", describe_delivery_key(key)))
    }

    pub(super) fn decode_seq_key(&self, tree: &str, key: &[u8]) -> Result<u64, StoreError> {
        decode_u64(&self.dir, tree, key, || "an event key".into())
    }

    pub(super) fn sled(&self, source: sled::Error) -> StoreError {
        StoreError::Sled { dir: self.dir.clone(), source }
    }

    pub(super) fn scan(
        &self,
        tree: &sled::Tree,
        name: &str,
        destination: Option<&str>,
    ) -> anyhow::Result<Vec<Delivery>> {
        let iter = match destination {
            Some(d) => tree.scan_prefix(super::destination_prefix(d)),
            None => tree.iter(),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|source| self.sled(source))?;
            out.push(self.decode_delivery(name, &k, &v)?);
        }
        Ok(out)
    }
}

/// "to \"siem\", event #12", from an outbox key (destination, 0, seq).
fn describe_delivery_key(key: &[u8]) -> String {
    let name_end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    let name = String::from_utf8_lossy(&key[..name_end]);
    match key.get(name_end + 1..).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
        Some(seq) => format!("to {name:?} of event #{}", u64::from_be_bytes(seq)),
        None => format!("to {name:?}"),
    }
}
