//! What can go wrong with the state database, as types: callers branch on the kind (a damaged
//! store stops the command with exit 2 and writes nothing; a locked one is waited for).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database (sled admits one).
    #[error(
        "the state database {} is in use by another policy-audit process (is the daemon running? then it answers through its control socket)",
        dir.display()
    )]
    Locked { dir: PathBuf },
    /// A record does not decode: never read as a default, since a default (a sequence number
    /// of 0, the genesis link) would overwrite the trail at the next write.
    #[error(
        "state database is damaged: {what}, {location}; restore from backup, see docs/operations.md (\"A damaged state directory\")"
    )]
    Damaged { what: String, location: String },
    /// sled itself failed (I/O, or its own corruption checks).
    #[error("state database {}: {source}", dir.display())]
    Sled { dir: PathBuf, source: sled::Error },
    /// A query the indexes cannot answer as asked (a time bound that is not a time).
    #[error("{0}")]
    BadQuery(String),
    /// The database was written by a newer policy-audit, in a layout this binary does not know:
    /// reading it could take new events for missing ones.
    #[error(
        "the state database {} was written by a newer policy-audit (store format {found}; this binary reads formats up to {known}): run that release, or restore the backup taken before the upgrade (see docs/operations.md, \"Upgrading\")",
        dir.display()
    )]
    TooNew { dir: PathBuf, found: u32, known: u32 },
    /// A transaction did not commit.
    #[error("state database {}: {message}", dir.display())]
    Transaction { dir: PathBuf, message: String },
}

impl StoreError {
    /// Whether `e` (anywhere in its chain) says the database is damaged.
    pub fn is_damaged(e: &anyhow::Error) -> bool {
        e.chain().any(|c| matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Damaged { .. })))
    }
}
