//! Behaviours of the outbox (`docs/design.md`, "Notifications: the outbox"): every
//! committed change has its events, a refused one has none, numbers increase, durable
//! consumers keep a cursor and a lease, and trimming never passes a consumer. Run by
//! every store as part of the shared suite (re-exported from [`super::suite`]).

use std::time::Duration;

use futures::StreamExt;

use super::suite::put_manifest;
use super::*;
use crate::events::{Event, StoredEvent};
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::TagPattern;

/// Every event after `after`, read in small pages (so paging is exercised).
async fn all_after(r: &Registry, after: u64) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    let mut cursor = after;
    let mut waited = 0;
    loop {
        let page = r.events_after(cursor, 3).await.expect("events_after");
        assert_eq!(page.missed_through, 0, "nothing was trimmed");
        if page.events.is_empty() {
            // On PostgreSQL a page stops at a number that may still appear until every
            // transaction open when it was seen (in the whole cluster) has ended;
            // numbers were handed out beyond the cursor, so give them a moment. (The
            // last ones may belong to rolled-back transactions: then nothing comes.)
            let head = r.events_head().await.expect("events_head");
            if head > page.next_after && waited < 20 {
                waited += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return out;
        }
        assert!(page.next_after > cursor);
        cursor = page.next_after;
        out.extend(page.events);
    }
}

fn kinds(events: &[StoredEvent]) -> Vec<Event> {
    events.iter().map(|e| e.event.clone()).collect()
}

fn assert_increasing(events: &[StoredEvent]) {
    for w in events.windows(2) {
        assert!(w[0].seq < w[1].seq, "numbers increase: {w:?}");
    }
}

/// Each change writes exactly its events, in the order it made them: a repository's
/// creation first, its deletion last, a re-push too, nothing for a no-op.
pub async fn outbox_records_every_change(f: Fixture) {
    let (r, _) = f.registry();
    let head = r.events_head().await.unwrap();
    let (a, b) = (repo("suite/outbox/a"), repo("suite/outbox/b"));
    let cfg = push_blob(&r, &a, b"{}").await;
    // Pushing the same bytes again links nothing new: no event.
    push_blob(&r, &a, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    let size = m.len() as u64;
    let pushed = put_manifest(&r, &a, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    let d = pushed.digest.clone();
    // A re-push of the same manifest under the same tag changes nothing: no event.
    put_manifest(&r, &a, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    r.tag_manifest(&a, &tag("v2"), &d).await.unwrap();
    assert!(
        r.mount_blob(&b, &cfg, Some(&a), &crate::AllowAll)
            .await
            .unwrap()
    );
    r.delete_manifest(&a, &tag_ref("v2")).await.unwrap();
    r.delete_manifest(&a, &Reference::Digest(d.clone()))
        .await
        .unwrap();
    r.delete_blob(&a, &cfg).await.unwrap();
    r.delete_blob(&b, &cfg).await.unwrap();

    let events = all_after(&r, head).await;
    assert_increasing(&events);
    let manifest_put = Event::ManifestPut {
        repo: a.clone(),
        digest: d.clone(),
        media_type: OCI_MANIFEST.into(),
        subject: None,
        size,
    };
    assert_eq!(
        kinds(&events),
        vec![
            Event::RepositoryCreated { repo: a.clone() },
            Event::BlobStored {
                repo: a.clone(),
                digest: cfg.clone(),
                size: 2
            },
            manifest_put,
            Event::TagMoved {
                repo: a.clone(),
                tag: tag("v1"),
                from: None,
                to: d.clone()
            },
            Event::TagMoved {
                repo: a.clone(),
                tag: tag("v2"),
                from: None,
                to: d.clone()
            },
            Event::RepositoryCreated { repo: b.clone() },
            Event::BlobMounted {
                repo: b.clone(),
                from: a.clone(),
                digest: cfg.clone()
            },
            Event::TagDeleted {
                repo: a.clone(),
                tag: tag("v2"),
                digest: d.clone()
            },
            Event::ManifestDeleted {
                repo: a.clone(),
                digest: d.clone(),
                tags: vec![tag("v1")]
            },
            Event::BlobDeleted {
                repo: a.clone(),
                digest: cfg.clone()
            },
            Event::RepositoryDeleted { repo: a.clone() },
            Event::BlobDeleted {
                repo: b.clone(),
                digest: cfg.clone()
            },
            Event::RepositoryDeleted { repo: b.clone() },
        ]
    );
    // Ids are stable (another read gives the same) and distinct.
    let again = all_after(&r, head).await;
    assert_eq!(
        events.iter().map(StoredEvent::id).collect::<Vec<_>>(),
        again.iter().map(StoredEvent::id).collect::<Vec<_>>()
    );
    let ids: std::collections::BTreeSet<_> = events.iter().map(StoredEvent::id).collect();
    assert_eq!(ids.len(), events.len());
    assert_eq!(r.events_head().await.unwrap(), events.last().unwrap().seq);

    // The collector's removals are events too.
    let before = r.events_head().await.unwrap();
    r.collect_garbage(&GcOptions {
        window: Some(Duration::ZERO),
        ..Default::default()
    })
    .await
    .unwrap();
    let collected = kinds(&all_after(&r, before).await);
    assert!(
        collected.contains(&Event::BlobCollected {
            digest: cfg.clone(),
            size: 2
        }),
        "{collected:?}"
    );
    assert_cleans_up(&r).await;
}

/// A refused change writes no event: the event exists if and only if the change does.
pub async fn outbox_refused_change_records_nothing(f: Fixture) {
    let (b, _) = f.builder();
    let r = b
        .with_immutable_tags(TagPattern::parse("v*").unwrap())
        .build();
    let a = repo("suite/outbox/refused");
    let (d, _) = push_image(&r, &a, "v1", b"{}", &[b"layer"]).await;
    let head = r.events_head().await.unwrap();
    // A manifest naming a blob the repository does not hold.
    let missing = image_manifest(b"{}", &[b"never pushed"]);
    assert!(
        put_manifest(&r, &a, &tag_ref("v9"), OCI_MANIFEST, &missing)
            .await
            .is_err()
    );
    // Moving an immutable tag, deleting a tagged manifest whose tag is immutable.
    let other = image_manifest(b"{}", &[]);
    assert!(
        put_manifest(&r, &a, &tag_ref("v1"), OCI_MANIFEST, &other)
            .await
            .is_err()
    );
    assert!(
        r.delete_manifest(&a, &Reference::Digest(d.clone()))
            .await
            .is_err()
    );
    let after = all_after(&r, head).await;
    assert!(after.is_empty(), "refused changes wrote events: {after:?}");
    // Without the policy, the same storage can be emptied.
    let (plain, _) = f.registry();
    plain.delete_repository(&a).await.unwrap();
    assert_cleans_up(&plain).await;
}

/// Concurrent changes get distinct, increasing numbers, and every one is read exactly
/// once, whatever order the transactions commit in.
pub async fn outbox_concurrent_changes_are_numbered_once(f: Fixture) {
    let (r, _) = f.registry();
    let a = repo("suite/outbox/concurrent");
    push_blob(&r, &a, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    put_manifest(&r, &a, &tag_ref("base"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    let head = r.events_head().await.unwrap();
    let n = 16;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (r, a, m) = (r.clone(), a.clone(), m.clone());
            tokio::spawn(async move {
                put_manifest(&r, &a, &tag_ref(&format!("t{i}")), OCI_MANIFEST, &m)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let events = all_after(&r, head).await;
    assert_increasing(&events);
    let mut tags: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TagMoved { tag, .. } => Some(tag.to_string()),
            _ => None,
        })
        .collect();
    tags.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    want.sort();
    assert_eq!(tags, want, "one TagMoved per push, none twice");
    assert_eq!(
        events.len(),
        n,
        "a TagMoved per push of a manifest already there"
    );

    // A stream from the same point sees the same events, then waits for the next.
    let mut stream = Box::pin(r.events_from(head, Duration::from_millis(50)));
    for e in &events {
        assert_eq!(&stream.next().await.unwrap().unwrap(), e);
    }
    let r2 = r.clone();
    let a2 = a.clone();
    let late = tokio::spawn(async move { r2.delete_manifest(&a2, &tag_ref("t0")).await });
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the stream wakes for a new change")
        .unwrap()
        .unwrap();
    late.await.unwrap().unwrap();
    assert!(matches!(next.event, Event::TagDeleted { .. }), "{next:?}");
    r.delete_repository(&a).await.unwrap();
    assert_cleans_up(&r).await;
}

/// Durable consumers: a new one starts at the head; one owner at a time holds the
/// lease, which another takes over once it expires; acknowledgements raise the cursor
/// (never lower it); and trimming removes only what every consumer has acknowledged.
pub async fn outbox_consumers_and_trimming(f: Fixture) {
    let (r, clock) = f.registry();
    let a = repo("suite/outbox/consumers");
    push_blob(&r, &a, b"one").await;
    let head = r.events_head().await.unwrap();
    let lease = Duration::from_secs(30);
    assert_eq!(
        r.claim_events("hook", "p1", lease).await.unwrap(),
        Some(head),
        "a new consumer starts at the head"
    );
    assert_eq!(r.claim_events("hook", "p2", lease).await.unwrap(), None);
    push_blob(&r, &a, b"two").await;
    push_blob(&r, &a, b"three").await;
    let page = r.events_after(head, 100).await.unwrap();
    assert_eq!(page.events.len(), 2);
    let first = page.events[0].seq;
    assert!(r.ack_events("hook", "p1", first, lease).await.unwrap());
    assert!(
        !r.ack_events("hook", "p2", page.next_after, lease)
            .await
            .unwrap(),
        "only the owner acknowledges"
    );

    // Nothing the consumer lacks is trimmed, even with no retention at all.
    r.trim_events(Duration::ZERO, 0).await.unwrap();
    let left = r.events_after(0, 100).await.unwrap();
    assert_eq!(left.events.first().map(|e| e.seq), Some(page.next_after));
    assert!(left.missed_through >= first);

    // The lease expires: p2 takes over at p1's cursor; p1 has lost it.
    clock.advance(lease + Duration::from_secs(1));
    assert_eq!(
        r.claim_events("hook", "p2", lease).await.unwrap(),
        Some(first)
    );
    assert!(
        !r.ack_events("hook", "p1", page.next_after, lease)
            .await
            .unwrap()
    );
    assert!(
        r.ack_events("hook", "p2", page.next_after, lease)
            .await
            .unwrap()
    );
    assert!(r.ack_events("hook", "p2", first, lease).await.unwrap());
    let consumers = r.event_consumers().await.unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].0, "hook");
    assert_eq!(consumers[0].1.cursor, page.next_after, "never lowered");

    // Everything acknowledged: all of it may go, and an ad-hoc reader from 0 is told
    // what it missed.
    assert!(r.trim_events(Duration::ZERO, 0).await.unwrap() >= 1);
    let after = r.events_after(0, 100).await.unwrap();
    assert!(after.events.is_empty());
    assert!(after.missed_through >= page.next_after);
    // Retention by count keeps the newest.
    push_blob(&r, &a, b"four").await;
    push_blob(&r, &a, b"five").await;
    let newest = r.events_head().await.unwrap();
    assert!(r.ack_events("hook", "p2", newest, lease).await.unwrap());
    r.trim_events(Duration::from_secs(3600), 1).await.unwrap();
    let kept = r.events_after(0, 100).await.unwrap();
    assert_eq!(
        kept.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![newest]
    );
    r.delete_repository(&a).await.unwrap();
    assert_cleans_up(&r).await;
}
