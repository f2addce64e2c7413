//! The outbox: every write transaction that changes the registry's content appends its
//! events to [`Table::Outbox`] before it commits, so an event exists if and only if its
//! change does (`docs/design.md`, "Notifications: the outbox"). Durable consumers keep
//! their cursor and delivery lease in [`Table::OutboxConsumers`].
//!
//! Keys of the outbox are sequence numbers, 8 bytes big-endian, so that key order is
//! number order. Engines whose write transactions run one at a time (memory, redb, the
//! bucket log) number with a counter inside the transaction, so numbers are gapless and
//! visible in order. An engine with concurrent writers (PostgreSQL) overrides
//! [`KvWrite::append_event`] and [`KvRead::outbox_horizon`]: see `MetadataStore::
//! events_after` for how readers wait for numbers that may still become visible.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::event_codec::{decode_entry, encode_entry, entry_time};
use super::{KvRead, KvWrite, Table, decode, encode, get, put};
use crate::error::{Error, Result};
use crate::events::{ConsumerRecord, Event, OutboxRead, StoredEvent};
use crate::time::Timestamp;

/// [`Table::OutboxState`] key: the next sequence number (counting engines only).
const NEXT: &[u8] = b"next";
/// [`Table::OutboxState`] key: every number at or below this was trimmed.
const TRIMMED: &[u8] = b"trimmed";

/// A sequence number as an outbox key.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(k: &[u8]) -> Result<u64> {
    let b: [u8; 8] = k
        .try_into()
        .map_err(|_| Error::storage("corrupt outbox key: not 8 bytes"))?;
    Ok(u64::from_be_bytes(b))
}

/// [`KvWrite::append_event`] for engines whose write transactions are serial: the next
/// number from a counter kept in the same transaction.
pub(super) fn append_counted<T: KvWrite + ?Sized>(t: &mut T, value: &[u8]) -> Result<()> {
    let next: u64 = match t.get(Table::OutboxState, NEXT)? {
        Some(v) => decode(&v)?,
        None => 1,
    };
    t.put(Table::Outbox, &seq_key(next), value)?;
    t.put(Table::OutboxState, NEXT, &encode(&(next + 1))?)
}

/// The outbox's head when its table holds no entry (none written yet, or all
/// trimmed): the counter's last number or the last trimmed one, whichever is higher.
/// For engines that number from the last entry instead of a counter (redb), which fall
/// back to it when the table is empty.
pub fn head_of_empty<T: KvRead + ?Sized>(t: &T) -> Result<u64> {
    let trimmed = match t.get(Table::OutboxState, TRIMMED)? {
        Some(v) => decode::<u64>(&v)?,
        None => 0,
    };
    Ok(head_counted(t)?.max(trimmed))
}

/// The number an outbox key holds.
pub fn key_number(k: &[u8]) -> Result<u64> {
    key_seq(k)
}

/// [`KvRead::outbox_head`] for counting engines.
pub(super) fn head_counted<T: KvRead + ?Sized>(t: &T) -> Result<u64> {
    Ok(match t.get(Table::OutboxState, NEXT)? {
        Some(v) => decode::<u64>(&v)?.saturating_sub(1),
        None => 0,
    })
}

fn wall_clock() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// Appends `event` to the outbox of the transaction `t` is in.
pub(super) fn record_event(t: &mut dyn KvWrite, event: Event) -> Result<()> {
    t.append_event(&encode_entry(wall_clock(), &event))
}

/// Outbox entries after `after`, at most `limit`, with what a reader needs to judge
/// gaps.
pub(super) fn read(t: &dyn KvRead, after: u64, limit: usize) -> Result<OutboxRead> {
    let horizon = t.outbox_horizon()?;
    let trimmed_through = get::<u64>(t, Table::OutboxState, TRIMMED)?.unwrap_or(0);
    let mut events = Vec::new();
    for (k, v) in t.scan(Table::Outbox, b"", Some(&seq_key(after)), limit)? {
        let entry = decode_entry(&v)?;
        events.push(StoredEvent {
            seq: key_seq(&k)?,
            at: entry.at,
            event: entry.event,
        });
    }
    Ok(OutboxRead {
        events,
        trimmed_through,
        horizon,
    })
}

/// Takes (or renews) `owner`'s delivery lease on consumer `name`; its cursor if `owner`
/// holds the lease now. A new consumer starts at the current head: it is sent what
/// happens from now on, not the retained history.
pub(super) fn claim(
    t: &mut dyn KvWrite,
    name: &str,
    owner: &str,
    now: Timestamp,
    lease: Duration,
) -> Result<Option<u64>> {
    let k = name.as_bytes();
    let rec = match get::<ConsumerRecord>(t, Table::OutboxConsumers, k)? {
        Some(rec) if rec.owner != owner && !rec.owner.is_empty() && rec.lease_until > now => {
            return Ok(None);
        }
        Some(rec) => rec,
        None => ConsumerRecord {
            cursor: t.outbox_head()?,
            owner: String::new(),
            lease_until: now,
            updated_at: now,
        },
    };
    let rec = ConsumerRecord {
        owner: owner.to_owned(),
        lease_until: now.saturating_add(lease),
        updated_at: now,
        ..rec
    };
    put(t, Table::OutboxConsumers, k, &rec)?;
    Ok(Some(rec.cursor))
}

/// Stores `cursor` for consumer `name` and renews the lease, if `owner` still holds it.
pub(super) fn ack(
    t: &mut dyn KvWrite,
    name: &str,
    owner: &str,
    cursor: u64,
    now: Timestamp,
    lease: Duration,
) -> Result<bool> {
    let k = name.as_bytes();
    let Some(mut rec) = get::<ConsumerRecord>(t, Table::OutboxConsumers, k)? else {
        return Ok(false);
    };
    if rec.owner != owner {
        return Ok(false);
    }
    rec.cursor = rec.cursor.max(cursor);
    rec.lease_until = now.saturating_add(lease);
    rec.updated_at = now;
    put(t, Table::OutboxConsumers, k, &rec)?;
    Ok(true)
}

/// Every consumer, by name.
pub(super) fn consumers(t: &dyn KvRead) -> Result<Vec<(String, ConsumerRecord)>> {
    t.scan(Table::OutboxConsumers, b"", None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            let name = String::from_utf8(k).map_err(Error::storage)?;
            Ok((name, decode(&v)?))
        })
        .collect()
}

/// A consumer not heard from for this long no longer holds back trimming: it was
/// removed from every configuration (or its processes are gone for good), and the
/// outbox must not grow forever for it.
pub const STALE_CONSUMER: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many entries one trimming transaction removes at most.
const TRIM_BATCH: usize = 1000;

/// Removes entries every live consumer has acknowledged and that are older than
/// `retention` or beyond the newest `max_events`, oldest first, at most one batch.
pub(super) fn trim(
    t: &mut dyn KvWrite,
    now: Timestamp,
    retention: Duration,
    max_events: u64,
) -> Result<u64> {
    let stale = now.saturating_sub(STALE_CONSUMER);
    let hold = consumers(t)?
        .into_iter()
        .filter(|(_, c)| c.updated_at >= stale)
        .map(|(_, c)| c.cursor)
        .min()
        .unwrap_or(u64::MAX);
    let cutoff = now.saturating_sub(retention);
    let total = t.count(Table::Outbox)?;
    let mut removed = 0u64;
    let mut last = None;
    for (k, v) in t.scan(Table::Outbox, b"", None, TRIM_BATCH)? {
        let seq = key_seq(&k)?;
        if seq > hold {
            break;
        }
        if entry_time(&v)? > cutoff && total - removed <= max_events {
            break;
        }
        t.delete(Table::Outbox, &k)?;
        removed += 1;
        last = Some(seq);
    }
    if let Some(last) = last {
        let before = get::<u64>(t, Table::OutboxState, TRIMMED)?.unwrap_or(0);
        put(t, Table::OutboxState, TRIMMED, &before.max(last))?;
    }
    Ok(removed)
}
