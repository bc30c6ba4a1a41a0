//! Event bodies as stored in the `events` tree. The body of an event is its canonical JSON (what
//! the chain links over, what is streamed, exported and served); on disk it is compressed with
//! zstd against a small dictionary built into the binary (≈ 1.1 KB of JSON → ≈ 0.2 KB).
//!
//! Invariants:
//! - a stored value that starts with `{` is the plain JSON (stores written before compression,
//!   and bodies too large to compress, see [`MAX_BODY_BYTES`]); one that starts with [`ZSTD_V1`]
//!   is a zstd frame of the JSON made with [`DICTIONARY_V1`]; one that starts with
//!   [`LINKED_V1`] is the event's chain link (32 bytes, see `chain`) and then that same frame.
//!   All three are read forever, so an existing store needs no migration. Events stored with
//!   their link in the body have none in the `chain` tree (one sled key less per event);
//!   the others keep theirs there;
//! - the dictionary of a marker never changes (the records written with it would no longer
//!   decode): a new dictionary takes a new marker. A test pins its SHA-256;
//! - every reader of event bytes goes through [`decode`]; a value that does not decode is an
//!   error (the store reports it as `StoreError::Damaged`), never skipped.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::LazyLock;
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The marker of a zstd frame made with [`DICTIONARY_V1`] (plain JSON starts with `{`).
pub const ZSTD_V1: u8 = 0x01;
/// The marker of a chain link (32 bytes) followed by a [`ZSTD_V1`] frame (without its marker).
pub const LINKED_V1: u8 = 0x02;
const LINK_LEN: usize = 32;

/// A raw-content dictionary: one event of each type, as reconciles of the test fixtures wrote
/// them. zstd finds the keys and the recurring values of a new event in it.
pub const DICTIONARY_V1: &[u8] = include_bytes!("event-dictionary-v1.jsonl");

/// zstd's default level: ≈ 20 µs per event either way; higher levels gain a few percent.
const LEVEL: i32 = 3;

/// Bodies above this are stored plain, and a frame that claims more is damaged: a damaged
/// header must not make a reader allocate gigabytes. Events are far smaller (a policy file is
/// capped at 1 MiB by default and an event holds a truncated list of its changes).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

static ENCODER_V1: LazyLock<EncoderDictionary<'static>> =
    LazyLock::new(|| EncoderDictionary::copy(DICTIONARY_V1, LEVEL));
static DECODER_V1: LazyLock<DecoderDictionary<'static>> = LazyLock::new(|| DecoderDictionary::copy(DICTIONARY_V1));

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The stored form of an event's canonical JSON.
pub fn encode(json: &[u8]) -> std::io::Result<Vec<u8>> {
    if json.len() > MAX_BODY_BYTES {
        return Ok(json.to_vec());
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(c) => c,
            None => {
                let mut c = zstd::bulk::Compressor::with_prepared_dictionary(&ENCODER_V1)?;
                // 4 bytes per event, so that a damaged body is an error rather than other JSON.
                c.include_checksum(true)?;
                slot.insert(c)
            }
        };
        let mut out = Vec::with_capacity(1 + zstd::zstd_safe::compress_bound(json.len()));
        out.push(ZSTD_V1);
        let frame = compressor.compress(json)?;
        out.extend_from_slice(&frame);
        Ok(out)
    })
}

/// A body [`encode`] made, with the event's chain link in front; None for a plain body
/// (its link goes to the `chain` tree).
pub fn with_link(stored: &[u8], link: &[u8; LINK_LEN]) -> Option<Vec<u8>> {
    let frame = stored.strip_prefix(&[ZSTD_V1])?;
    let mut out = Vec::with_capacity(1 + LINK_LEN + frame.len());
    out.push(LINKED_V1);
    out.extend_from_slice(link);
    out.extend_from_slice(frame);
    Some(out)
}

/// The chain link a stored body carries: None when it carries none (plain or [`ZSTD_V1`]
/// bodies: their link is in the `chain` tree), the bytes there are when too short.
pub fn link(stored: &[u8]) -> Option<Result<[u8; LINK_LEN], &[u8]>> {
    let rest = stored.strip_prefix(&[LINKED_V1])?;
    Some(match rest.get(..LINK_LEN) {
        Some(link) => Ok(link.try_into().unwrap_or([0; LINK_LEN])),
        None => Err(rest),
    })
}

/// The canonical JSON of a stored event body (borrowed when it is stored plain), or why it
/// does not decode.
pub fn decode(stored: &[u8]) -> Result<Cow<'_, [u8]>, String> {
    match stored.first() {
        Some(b'{') => Ok(Cow::Borrowed(stored)),
        Some(&ZSTD_V1) => decompress(&stored[1..]).map(Cow::Owned),
        Some(&LINKED_V1) => match stored.get(1 + LINK_LEN..) {
            Some(frame) => decompress(frame).map(Cow::Owned),
            None => Err("it is shorter than its chain link".into()),
        },
        Some(other) => Err(format!("its format marker 0x{other:02x} is unknown")),
        None => Err("it is empty".into()),
    }
}

fn decompress(frame: &[u8]) -> Result<Vec<u8>, String> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) => size,
        Ok(None) => return Err("its compressed frame does not state its size".into()),
        Err(_) => return Err("its compressed frame has no valid header".into()),
    };
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= MAX_BODY_BYTES)
        .ok_or_else(|| format!("its compressed frame claims {size} bytes, more than the {MAX_BODY_BYTES} allowed"))?;
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(
                zstd::bulk::Decompressor::with_prepared_dictionary(&DECODER_V1)
                    .map_err(|e| format!("the decompressor cannot start ({e})"))?,
            ),
        };
        let json = decompressor
            .decompress(frame, size)
            .map_err(|e| format!("its compressed frame does not decompress ({e})"))?;
        if json.len() != size {
            return Err(format!("its compressed frame holds {} bytes, not the {size} it states", json.len()));
        }
        Ok(json)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_dictionary_of_marker_1_never_changes() {
        // Records written with marker 1 decode only with these exact bytes: a changed
        // dictionary needs a new marker (and this one kept for the old records).
        let digest: [u8; 32] = Sha256::digest(DICTIONARY_V1).into();
        assert_eq!(
            crate::store::chain::hex(&digest),
            "0f594e84890f0ee6595c5b62fda4e8c65dec7fdb01115553db91922473203bea"
        );
    }

    #[test]
    fn bodies_round_trip_smaller_and_plain_json_is_read_as_it_is() {
        for line in DICTIONARY_V1.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let stored = encode(line).expect("encode");
            assert_eq!(stored[0], ZSTD_V1);
            assert!(stored.len() * 3 < line.len(), "{} -> {} bytes", line.len(), stored.len());
            assert_eq!(decode(&stored).expect("decode").as_ref(), line);
            assert!(matches!(decode(line).expect("plain"), Cow::Borrowed(b) if b == line));
        }
    }

    #[test]
    fn a_linked_body_carries_its_link_and_the_same_json() {
        let json = br#"{"id":"x","event_type":"security_policy_create"}"#;
        let stored = encode(json).expect("encode");
        let linked = with_link(&stored, &[9; LINK_LEN]).expect("linked");
        assert_eq!(linked[0], LINKED_V1);
        assert_eq!(link(&linked), Some(Ok([9; LINK_LEN])));
        assert_eq!(decode(&linked).expect("decode").as_ref(), json);
        assert_eq!(link(&stored), None, "a ZSTD_V1 body has its link in the chain tree");
        assert_eq!(with_link(json, &[9; LINK_LEN]), None, "a plain body keeps its link in the chain tree");
        assert_eq!(link(&[LINKED_V1, 1, 2, 3]), Some(Err(&[1u8, 2, 3][..])));
    }

    #[test]
    fn damaged_bodies_are_errors_not_events() {
        let stored = encode(br#"{"id":"x","event_type":"security_policy_create"}"#).expect("encode");
        let mut cut = stored.clone();
        cut.truncate(stored.len() - 3);
        assert!(decode(&cut).is_err());
        let mut lying = stored.clone();
        lying[0] = 0x03;
        assert_eq!(decode(&lying).unwrap_err(), "its format marker 0x03 is unknown");
        assert_eq!(decode(&[LINKED_V1, 7, 7]).unwrap_err(), "it is shorter than its chain link");
        assert!(decode(&[ZSTD_V1]).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&[ZSTD_V1, 0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
