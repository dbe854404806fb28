//! Instances of a shared name (`ServerBuilder::shared`) that also serve on NATS: each is a NATS
//! micro service of its own in the one queue group, so NATS callers are spread over them as
//! local callers are, each answers `$SRV.INFO`/`$SRV.STATS` for itself (the same id and
//! counters as its local `$info`/`$stats`), and when one is killed the others answer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use microcs::nats::NatsOptions;
use microcs_testsupport::Nats;

use super::nats_client;
use crate::common::{PeerProcess, TempDir, eventually, unique, watchdog};

/// The instance ids the broker knows for `name` (`$SRV.INFO.NAME`), with each one's pid.
fn on_nats(url: &str, name: &str) -> BTreeMap<String, String> {
    microcs::nats::list(&NatsOptions::new(url), Some(name), Duration::from_secs(2))
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.metadata.get("pid").cloned().unwrap_or_default()))
        .collect()
}

/// Requests of the method `pid` per instance id, from each instance's `$SRV.STATS`.
fn pid_calls_on_nats(url: &str, name: &str) -> BTreeMap<String, u64> {
    microcs::nats::list_stats(&NatsOptions::new(url), Some(name), Duration::from_secs(2))
        .unwrap()
        .into_iter()
        .map(|s| {
            let n = s.endpoints.iter().find(|e| e.name == "pid").map_or(0, |e| e.num_requests);
            (s.id, n)
        })
        .collect()
}

#[test]
fn instances_on_nats_are_one_queue_group_answer_for_themselves_and_survive_a_kill() {
    let _w = watchdog(Duration::from_secs(120));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("ninst");
    let name = unique("NINST");
    let env = [("PEER_SHARED", "1"), ("PEER_NATS", url.as_str())];
    let mut peers: Vec<_> = ["serve", "serve-tokio", "serve"]
        .iter()
        .map(|mode| PeerProcess::serve_mode(dir.path(), mode, &name, &env))
        .collect();
    let pids: BTreeSet<String> = peers.iter().map(|p| p.pid.to_string()).collect();

    // Locally: three instances, each in its own slot.
    let local: Vec<(u32, u32)> = microcs::list_in(dir.path())
        .unwrap()
        .into_iter()
        .filter(|s| s.name.as_str() == name)
        .map(|s| (s.instance.expect("an instance"), s.pid))
        .collect();
    assert_eq!(local.len(), 3, "{local:?}");

    // On NATS: three micro services of one name, one per instance, each with its own id, and
    // each instance's id there is the one its local `$info` reports.
    let ids = on_nats(&url, &name);
    assert_eq!(ids.values().cloned().collect::<BTreeSet<_>>(), pids, "{ids:?}");
    for (slot, pid) in &local {
        let mut c = dir.client(&name).instance(*slot).connect().unwrap();
        let info = c.info().unwrap();
        assert_eq!(ids.get(&info.id), Some(&pid.to_string()), "slot {slot}: {info:?}");
        assert!(info.endpoints.iter().all(|e| e.queue_group == "q"), "{:?}", info.endpoints);
    }

    // NATS callers are spread over all three (the broker's queue group), and each instance
    // counts its own share: the shares add up to the calls.
    let mut c = nats_client(&url, &name).connect().unwrap();
    let mut answered = BTreeMap::<String, u32>::new();
    for _ in 0..90 {
        *answered.entry(String::from_utf8(c.call("pid", b"").unwrap()).unwrap()).or_default() += 1;
    }
    assert_eq!(answered.keys().cloned().collect::<BTreeSet<_>>(), pids, "{answered:?}");
    let counted = pid_calls_on_nats(&url, &name);
    assert_eq!(counted.len(), 3, "{counted:?}");
    assert_eq!(counted.values().sum::<u64>(), 90, "{counted:?}");
    for (id, pid) in &ids {
        assert_eq!(counted[id], u64::from(answered[pid]), "instance {pid}: {counted:?} {answered:?}");
    }

    // One killed (SIGKILL: no goodbye to the broker, the kernel closes its connection): once
    // the broker has dropped it, every call is answered by the other two, on NATS and locally.
    let victim = peers.remove(1);
    let victim_pid = victim.pid.to_string();
    victim.kill9();
    let gone = eventually(Duration::from_secs(20), || {
        let now = on_nats(&url, &name);
        (now.len() == 2 && !now.values().any(|p| *p == victim_pid)).then_some(())
    });
    assert!(gone.is_some(), "the broker still lists the killed instance: {:?}", on_nats(&url, &name));
    let mut after = BTreeSet::new();
    for _ in 0..40 {
        after.insert(String::from_utf8(c.call("pid", b"").unwrap()).unwrap());
    }
    let survivors: BTreeSet<String> = peers.iter().map(|p| p.pid.to_string()).collect();
    assert_eq!(after, survivors, "both survivors answer, the killed one never");
    for _ in 0..6 {
        let mut local = dir.client(&name).connect().unwrap();
        let pid = String::from_utf8(local.call("pid", b"").unwrap()).unwrap();
        assert!(survivors.contains(&pid), "{pid}");
    }
    for p in peers {
        assert!(p.stop().success());
    }
    let left = eventually(Duration::from_secs(10), || on_nats(&url, &name).is_empty().then_some(()));
    assert!(left.is_some(), "stopped instances leave NATS: {:?}", on_nats(&url, &name));
}
