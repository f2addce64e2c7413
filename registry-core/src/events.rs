//! Typed events for embedders: every change the registry makes.
//!
//! Two ways to see them:
//! - the outbox ([`Registry::events_after`](crate::Registry::events_after),
//!   [`Registry::events_from`](crate::Registry::events_from)): each change writes its
//!   events in the same atomic metadata change that makes it, numbered, so a change is
//!   committed if and only if its events are; every process sharing the storage sees
//!   them, and a consumer resumes from its cursor after a restart (`docs/design.md`,
//!   "Notifications: the outbox");
//! - [`Registry::subscribe`](crate::Registry::subscribe): the same events as this
//!   process makes them, in memory, with no delay and no durability (a slow receiver
//!   loses events).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{RepoName, Tag};
use crate::time::Timestamp;

/// A change made by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A blob upload finished and was linked into a repository.
    BlobStored {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// A blob was mounted into a repository from another.
    BlobMounted {
        /// The target repository.
        repo: RepoName,
        /// The source repository.
        from: RepoName,
        /// The blob.
        digest: Digest,
    },
    /// A repository's link to a blob was deleted.
    BlobDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A manifest was stored in a repository. Pushing it again changes nothing but its
    /// tags, and reports only a [`TagMoved`](Event::TagMoved) for each tag it moved.
    ManifestPut {
        /// Where.
        repo: RepoName,
        /// Its digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Its subject, if it is a referrer.
        subject: Option<Digest>,
        /// Its size in bytes.
        #[serde(default)]
        size: u64,
    },
    /// A tag now points at a different manifest.
    TagMoved {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at before, if anything.
        from: Option<Digest>,
        /// What it points at now.
        to: Digest,
    },
    /// A tag was deleted.
    TagDeleted {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at.
        digest: Digest,
    },
    /// A manifest was deleted from a repository (its tags with it).
    ManifestDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Tags deleted with it.
        tags: Vec<Tag>,
    },
    /// The collector removed a repository's unreferenced link to a blob.
    LinkCollected {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A repository got its first manifest or blob link.
    RepositoryCreated {
        /// The repository.
        repo: RepoName,
    },
    /// A repository lost its last manifest and blob link (by
    /// [`Registry::delete_repository`](crate::Registry::delete_repository), by deletes
    /// or by the collector). Each manifest (with its tags) and blob link it held was
    /// reported by its own event first.
    RepositoryDeleted {
        /// The repository.
        repo: RepoName,
    },
    /// The collector deleted a blob's bytes.
    BlobCollected {
        /// What.
        digest: Digest,
        /// Bytes freed.
        size: u64,
    },
}

impl Event {
    /// The repository the change is in; `None` for [`Event::BlobCollected`], which is
    /// registry-wide.
    pub fn repository(&self) -> Option<&RepoName> {
        match self {
            Event::BlobStored { repo, .. }
            | Event::BlobMounted { repo, .. }
            | Event::BlobDeleted { repo, .. }
            | Event::ManifestPut { repo, .. }
            | Event::TagMoved { repo, .. }
            | Event::TagDeleted { repo, .. }
            | Event::ManifestDeleted { repo, .. }
            | Event::LinkCollected { repo, .. }
            | Event::RepositoryCreated { repo }
            | Event::RepositoryDeleted { repo } => Some(repo),
            Event::BlobCollected { .. } => None,
        }
    }
}

/// An event as the outbox keeps it: its place in the storage's history and when it
/// was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its sequence number: unique in the storage, increasing in the order the changes
    /// were committed (`docs/design.md` says how exactly on each store).
    pub seq: u64,
    /// When the change was made (the writing process's clock).
    pub at: Timestamp,
    /// The change.
    pub event: Event,
}

impl StoredEvent {
    /// An id that is the same in every process that reads this event, for receivers to
    /// drop duplicates (delivery is at least once): the sequence number and a hash of
    /// the event, so that two storages' events with one number still differ.
    pub fn id(&self) -> String {
        use sha2::Digest as _;
        let body = serde_json::to_vec(&(self.at, &self.event)).unwrap_or_default();
        let hash = sha2::Sha256::digest(&body);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        // The first 8 bytes of the hash in hex, as `{:02x}` per byte would write them.
        format!("{}-{:016x}", self.seq, u64::from_be_bytes(first))
    }

    /// The repository the change is in, if any.
    pub fn repository(&self) -> Option<&RepoName> {
        self.event.repository()
    }
}

/// The body of an outbox entry (the sequence number is its key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    pub at: Timestamp,
    pub event: Event,
}

/// A page of the outbox: see [`Registry::events_after`](crate::Registry::events_after).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventPage {
    /// Events after the cursor, in sequence order.
    pub events: Vec<StoredEvent>,
    /// The cursor to read from next: the last event's number, or further when numbers
    /// were skipped (never used, or trimmed).
    pub next_after: u64,
    /// Events up to this number had been trimmed before they were read: a reader whose
    /// cursor was behind them missed them. Zero when nothing was missed.
    pub missed_through: u64,
}

/// Where a store's raw outbox read stopped: the entries, and whether a gap (a number
/// not visible yet) may still fill. See [`MetadataStore::events_after`].
///
/// [`MetadataStore::events_after`]: crate::store::MetadataStore::events_after
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxRead {
    /// Entries after the cursor, in sequence order, possibly with gaps.
    pub events: Vec<StoredEvent>,
    /// Every number at or below this was trimmed.
    pub trimmed_through: u64,
    /// On engines whose numbers can become visible out of order (PostgreSQL), a token
    /// of the snapshot that read them: once [`MetadataStore::outbox_settled`] says so
    /// for it, every number missing below the last entry read is gone for good.
    /// `None` on engines whose numbers are visible in order (memory, redb, the bucket
    /// log): there a missing number is never coming.
    ///
    /// [`MetadataStore::outbox_settled`]: crate::store::MetadataStore::outbox_settled
    pub horizon: Option<u64>,
}

/// A durable consumer of the outbox: its cursor and who delivers for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// Every event up to here was acknowledged.
    pub cursor: u64,
    /// The process that holds the lease (empty: nobody).
    pub owner: String,
    /// The lease lasts until then.
    pub lease_until: Timestamp,
    /// Last acknowledgement or claim.
    pub updated_at: Timestamp,
}
