//! Cluster mode against a real `nats-server -js`: three daemons share one config (only
//! `state_dir` differs), several projects; one is killed with SIGKILL while it holds leases;
//! after the TTL the others take its projects over. Every change reaches the trail stream
//! exactly once, every surviving instance shows the whole trail and verifies its chain, a
//! destination is served once per cluster, and the lease history shows no project held by two
//! instances at once.

use crate::common::{Workspace, commit, stderr, stdout, wait_for};
use crate::nats_server::{NatsServer, block_on, read_stream};
use crate::receiver::Receiver;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

const POLICY: &str = ".gitlab/security-policies/policy.yml";
const PROJECTS: usize = 6;
const TTL_SECS: u64 = 3;

struct Instance {
    name: &'static str,
    config: PathBuf,
    child: Option<Child>,
}

impl Instance {
    fn start(ws: &Workspace, name: &'static str, shared: &str) -> Instance {
        let config = ws.write(&format!("{name}.toml"), &format!("state_dir = \"state-{name}\"\n{shared}"));
        let log = std::fs::File::create(ws.path(&format!("{name}.log"))).expect("log file");
        let child = crate::common::spawn_daemon(&config, log.into(), &[]);
        let socket = ws.path(&format!("state-{name}/control.sock"));
        wait_for(&format!("instance {name}'s control socket"), Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        Instance { name, config, child: Some(child) }
    }

    fn run(&self, ws: &Workspace, args: &[&str]) -> std::process::Output {
        ws.run(&self.config, args)
    }

    fn status(&self, ws: &Workspace) -> serde_json::Value {
        let out = self.run(ws, &["status", "--json"]);
        assert!(out.status.success(), "status on {}: {}", self.name, stderr(&out));
        serde_json::from_slice(&out.stdout).expect("status --json")
    }

    fn event_ids(&self, ws: &Workspace) -> Vec<String> {
        let out = self.run(ws, &["events", "--format", "json"]);
        assert!(out.status.success(), "events on {}: {}", self.name, stderr(&out));
        let events: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("events json");
        events.iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect()
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn add_policy(ws: &Workspace, project: usize, n: usize) {
    let repo = ws.path(&format!("spp{project}"));
    let file = ws.path(&format!("spp{project}/{POLICY}"));
    let mut text = std::fs::read_to_string(&file).unwrap_or_else(|_| "approval_policy:\n".into());
    text.push_str(&format!("- {{name: p{project}-{n}, enabled: false, rules: [{{type: any_merge_request, branch_type: protected, commits: any}}], approval_settings: {{block_branch_modification: true}}}}\n"));
    ws.write(&format!("spp{project}/{POLICY}"), &text);
    commit(&repo, "Alice", "alice@example.com", &format!("2024-02-01T10:{n:02}:{project:02}Z"), "policy");
}

/// Every project lease's history from the bucket: (key, [(holder, acquired_at, expires_at)]).
fn lease_history(url: &str) -> BTreeMap<String, Vec<(String, i64, i64)>> {
    block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value("policy-audit").await.expect("the cluster's bucket exists");
        let mut keys = kv.keys().await.expect("keys");
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.expect("key");
            if k.starts_with("lease.p.") {
                names.push(k);
            }
        }
        let mut out = BTreeMap::new();
        for key in names {
            let mut history = kv.history(&key).await.expect("history");
            let mut revisions = Vec::new();
            while let Some(entry) = history.next().await {
                let entry = entry.expect("history entry");
                let lease: serde_json::Value = serde_json::from_slice(&entry.value).expect("lease json");
                revisions.push((
                    lease["holder"].as_str().unwrap_or_default().to_string(),
                    lease["acquired_at"].as_i64().unwrap_or_default(),
                    lease["expires_at"].as_i64().unwrap_or_default(),
                ));
            }
            out.insert(key, revisions);
        }
        out
    })
}

fn holders(status: &serde_json::Value) -> BTreeMap<String, String> {
    status["cluster"]["leases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["lease"].as_str()?.to_string(), l["holder"].as_str()?.to_string())))
        .collect()
}

#[test]
fn three_instances_survive_a_kill_9_with_every_change_once_and_the_whole_trail_everywhere() {
    let nats = NatsServer::start();
    let receiver = Receiver::start(Vec::new());
    let ws = Workspace::new();
    let mut shared =
        format!("schedule = \"* * * * * *\"\n[cluster]\nnats_url = \"{}\"\nlease_ttl = \"{TTL_SECS}s\"\n", nats.url());
    for p in 0..PROJECTS {
        ws.init_repo(&format!("spp{p}"));
        add_policy(&ws, p, 0);
        add_policy(&ws, p, 1);
        shared.push_str(&format!(
            "[[projects]]\npath = \"acme/spp{p}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            ws.path(&format!("spp{p}")).display()
        ));
    }
    shared.push_str(&format!(
        "[[destinations]]\nname = \"siem\"\nurl = \"http://127.0.0.1:{}/audit\"\ntimeout = \"2s\"\n",
        receiver.port
    ));
    let mut instances: Vec<Instance> =
        ["a", "b", "c"].into_iter().map(|name| Instance::start(&ws, name, &shared)).collect();

    // Phase 1: the history of every project, once in the stream, everywhere, sent once.
    let expected = PROJECTS * 2;
    wait_for("the backfills in the trail stream", Duration::from_secs(60), || {
        read_stream(&nats.url(), None, "policy-audit-trail").len() >= expected
    });
    for i in &instances {
        wait_for(&format!("instance {}'s replica", i.name), Duration::from_secs(30), || {
            i.event_ids(&ws).len() >= expected
        });
    }
    wait_for("the destination to receive the trail", Duration::from_secs(30), || receiver.requests().len() >= expected);
    std::thread::sleep(Duration::from_secs(2));
    let sent: Vec<String> =
        receiver.requests().iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(sent.len(), expected, "served once per cluster, not once per instance: {sent:?}");

    // Every instance holds some projects once the leases are spread.
    let mut by_instance: BTreeMap<String, usize> = BTreeMap::new();
    wait_for("the project leases to spread over the instances", Duration::from_secs(30), || {
        by_instance.clear();
        for (lease, holder) in holders(&instances[0].status(&ws)) {
            if lease.starts_with("lease.p.") {
                *by_instance.entry(holder).or_default() += 1;
            }
        }
        by_instance.len() == 3
    });
    let victim_id = instances[1].status(&ws)["cluster"]["instance"].as_str().expect("instance id").to_string();
    let victim_projects: BTreeSet<String> = holders(&instances[0].status(&ws))
        .into_iter()
        .filter(|(l, h)| l.starts_with("lease.p.") && *h == victim_id)
        .map(|(l, _)| l)
        .collect();
    assert!(!victim_projects.is_empty(), "instance b holds projects: {by_instance:?}");

    // Phase 2: b dies holding leases; new changes land in every project.
    instances[1].kill9();
    let killed_at = Instant::now();
    for p in 0..PROJECTS {
        add_policy(&ws, p, 2);
    }
    let expected = PROJECTS * 3;
    wait_for("the others to take over b's projects", Duration::from_secs(30), || {
        let held = holders(&instances[0].status(&ws));
        victim_projects.iter().all(|l| held.get(l).is_some_and(|h| *h != victim_id))
    });
    let failover = killed_at.elapsed();
    wait_for("every new change in the trail stream", Duration::from_secs(60), || {
        read_stream(&nats.url(), None, "policy-audit-trail").len() >= expected
    });
    println!(
        "failover after kill -9: leases taken over {:.1}s after the kill (lease_ttl {TTL_SECS}s)",
        failover.as_secs_f64()
    );

    let stream = read_stream(&nats.url(), None, "policy-audit-trail");
    let ids: Vec<String> = stream.iter().map(|m| m.msg_id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "every change in the stream exactly once");
    assert_eq!(ids.len(), expected);
    for i in [&instances[0], &instances[2]] {
        wait_for(&format!("instance {}'s replica to catch up", i.name), Duration::from_secs(30), || {
            i.event_ids(&ws).len() >= expected
        });
        let mut theirs = i.event_ids(&ws);
        let mut all = ids.clone();
        theirs.sort();
        all.sort();
        assert_eq!(theirs, all, "instance {} shows the whole trail", i.name);
        let out = i.run(&ws, &["verify"]);
        assert!(out.status.success(), "verify on {}: {}{}", i.name, stdout(&out), stderr(&out));
    }
    // `status` on a survivor: every project's cursor (from the cluster) and who holds it.
    let status = instances[0].status(&ws);
    for p in status["projects"].as_array().expect("projects") {
        assert!(p["cursor"].is_string(), "the cluster's cursor is shown: {p}");
    }
    let text = stdout(&instances[2].run(&ws, &["status"]));
    assert!(text.contains("cluster policy-audit: this instance is"), "{text}");
    assert!(text.contains("lease.p.acme/spp0: held by"), "{text}");
    wait_for("the destination to receive the new changes", Duration::from_secs(30), || {
        let got: BTreeSet<String> =
            receiver.requests().iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect();
        ids.iter().all(|id| got.contains(id))
    });

    // No project was ever held by two instances at once: a new holder's lease starts after the
    // previous holder's last expiry.
    let mut taken_from_victim = 0;
    let history = lease_history(&nats.url());
    assert_eq!(history.len(), PROJECTS, "one lease per project");
    for (key, revisions) in history {
        let mut last: Option<(String, i64)> = None;
        for (holder, acquired_at, expires_at) in revisions {
            if let Some((previous, until)) = &last
                && !holder.is_empty()
                && holder != *previous
                && !previous.is_empty()
            {
                assert!(
                    acquired_at >= *until,
                    "{key}: {holder} took it at {acquired_at} while {previous} held it until {until}"
                );
                if *previous == victim_id {
                    taken_from_victim += 1;
                }
            }
            last = Some((holder, expires_at));
        }
    }
    assert!(taken_from_victim >= victim_projects.len(), "the history records the takeovers from b");
}

#[test]
fn a_destination_added_to_a_cluster_gets_the_history_from_its_lease_holder_once() {
    let nats = NatsServer::start();
    let late = Receiver::start(Vec::new());
    let ws = Workspace::new();
    let mut shared =
        format!("schedule = \"* * * * * *\"\n[cluster]\nnats_url = \"{}\"\nlease_ttl = \"3s\"\n", nats.url());
    for p in 0..2 {
        ws.init_repo(&format!("spp{p}"));
        for n in 0..3 {
            add_policy(&ws, p, n);
        }
        shared.push_str(&format!(
            "[[projects]]\npath = \"acme/spp{p}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            ws.path(&format!("spp{p}")).display()
        ));
    }
    let instances: Vec<Instance> = ["a", "b"].into_iter().map(|name| Instance::start(&ws, name, &shared)).collect();
    wait_for("the backfills on both replicas", Duration::from_secs(60), || {
        instances.iter().all(|i| i.event_ids(&ws).len() >= 6)
    });
    let trail: Vec<String> =
        read_stream(&nats.url(), None, "policy-audit-trail").iter().map(|m| m.msg_id.clone()).collect();

    // The destination is added to the shared config; both instances reload it.
    let with_late = format!(
        "{shared}[[destinations]]\nname = \"late\"\nurl = \"http://127.0.0.1:{}/audit\"\ntimeout = \"2s\"\n",
        late.port
    );
    for i in &instances {
        ws.write(&format!("{}.toml", i.name), &format!("state_dir = \"state-{}\"\n{with_late}", i.name));
        let pid = i.child.as_ref().expect("running").id().to_string();
        assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    }
    let mut holder = String::new();
    wait_for("a holder for the new destination", Duration::from_secs(30), || {
        holder = holders(&instances[0].status(&ws)).get("lease.d.late").cloned().unwrap_or_default();
        !holder.is_empty()
    });
    let (serving, other): (Vec<&Instance>, Vec<&Instance>) =
        instances.iter().partition(|i| i.status(&ws)["cluster"]["instance"].as_str() == Some(holder.as_str()));
    let (serving, other) = (serving[0], other[0]);

    let out = other.run(&ws, &["deliveries", "replay", "--destination", "late"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("destination \"late\" is served by {holder}")), "{}", stderr(&out));

    let out = serving.run(&ws, &["deliveries", "replay", "--destination", "late"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("queued 6 stored events for destination late"), "{}", stdout(&out));
    wait_for("the history at the new destination", Duration::from_secs(30), || late.requests().len() >= 6);
    std::thread::sleep(Duration::from_secs(2));
    let got: Vec<String> =
        late.requests().iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect();
    let mut expected = serving.event_ids(&ws);
    let mut in_trail = trail.clone();
    expected.sort();
    in_trail.sort();
    assert_eq!(expected, in_trail, "the replica holds the trail");
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, in_trail, "every event once: {got:?}");
    assert_eq!(got, trail, "in trail order");
}

#[test]
fn a_nats_restart_under_a_running_cluster_loses_and_repeats_nothing() {
    let mut nats = NatsServer::start();
    let ws = Workspace::new();
    let mut shared =
        format!("schedule = \"* * * * * *\"\n[cluster]\nnats_url = \"{}\"\nlease_ttl = \"3s\"\n", nats.url());
    for p in 0..3 {
        ws.init_repo(&format!("spp{p}"));
        add_policy(&ws, p, 0);
        shared.push_str(&format!(
            "[[projects]]\npath = \"acme/spp{p}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            ws.path(&format!("spp{p}")).display()
        ));
    }
    let instances: Vec<Instance> = ["a", "b"].into_iter().map(|name| Instance::start(&ws, name, &shared)).collect();
    wait_for("the backfills in the trail stream", Duration::from_secs(60), || {
        read_stream(&nats.url(), None, "policy-audit-trail").len() >= 3
    });

    // NATS goes away for longer than the lease TTL while new changes arrive.
    nats.stop();
    for p in 0..3 {
        add_policy(&ws, p, 1);
    }
    std::thread::sleep(Duration::from_secs(5));
    nats.resume();
    wait_for("the new changes in the trail stream", Duration::from_secs(60), || {
        read_stream(&nats.url(), None, "policy-audit-trail").len() >= 6
    });
    for i in &instances {
        wait_for(&format!("instance {}'s replica", i.name), Duration::from_secs(30), || i.event_ids(&ws).len() >= 6);
    }
    std::thread::sleep(Duration::from_secs(2));
    let ids: Vec<String> =
        read_stream(&nats.url(), None, "policy-audit-trail").iter().map(|m| m.msg_id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (6, 6), "each change once: {ids:?}");
    for i in &instances {
        let mut theirs = i.event_ids(&ws);
        theirs.sort();
        let mut all = ids.clone();
        all.sort();
        assert_eq!(theirs, all, "instance {} shows the whole trail", i.name);
    }
}

#[test]
fn a_single_instance_moves_into_a_cluster_without_losing_or_repeating_events() {
    let nats = NatsServer::start();
    let receiver = Receiver::start(Vec::new());
    let ws = Workspace::new();
    let mut projects = String::new();
    for p in 0..2 {
        ws.init_repo(&format!("spp{p}"));
        for n in 0..3 {
            add_policy(&ws, p, n);
        }
        projects.push_str(&format!(
            "[[projects]]\npath = \"acme/spp{p}\"\nurl = \"{}\"\ninitial_sync = \"backfill\"\n",
            ws.path(&format!("spp{p}")).display()
        ));
    }
    projects
        .push_str(&format!("[[destinations]]\nname = \"siem\"\nurl = \"http://127.0.0.1:{}/audit\"\n", receiver.port));

    // The single instance, as it ran until now.
    let single = ws.write("a.toml", &format!("state_dir = \"state-a\"\n{projects}"));
    let out = ws.run(&single, &["reconcile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(receiver.requests().len(), 6);

    // Stopped, it is imported into a new cluster.
    let shared =
        format!("schedule = \"* * * * * *\"\n[cluster]\nnats_url = \"{}\"\nlease_ttl = \"3s\"\n{projects}", nats.url());
    let clustered = ws.write("a.toml", &format!("state_dir = \"state-a\"\n{shared}"));
    let out = ws.run(&clustered, &["cluster-import"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("imported 6 event(s) into the cluster's trail and 2 project cursor(s)"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("destination siem: the first 6 event(s) count as delivered"), "{}", stdout(&out));
    let out = ws.run(&clustered, &["cluster-import"]);
    assert_eq!(out.status.code(), Some(2), "a second import is refused");
    assert!(stderr(&out).contains("already has 6 events"), "{}", stderr(&out));
    let imported: Vec<String> =
        read_stream(&nats.url(), None, "policy-audit-trail").iter().map(|m| m.msg_id.clone()).collect();

    // The old host (its state directory) and a new one form the cluster; changes go on.
    let instances: Vec<Instance> = ["a", "b"].into_iter().map(|name| Instance::start(&ws, name, &shared)).collect();
    for p in 0..2 {
        add_policy(&ws, p, 3);
    }
    wait_for("the new changes in the trail stream", Duration::from_secs(60), || {
        read_stream(&nats.url(), None, "policy-audit-trail").len() >= 8
    });
    for i in &instances {
        wait_for(&format!("instance {}'s replica", i.name), Duration::from_secs(30), || i.event_ids(&ws).len() >= 8);
    }
    wait_for("the destination to receive the new changes", Duration::from_secs(30), || receiver.requests().len() >= 8);
    std::thread::sleep(Duration::from_secs(2));

    let stream: Vec<String> =
        read_stream(&nats.url(), None, "policy-audit-trail").iter().map(|m| m.msg_id.clone()).collect();
    assert_eq!(stream.len(), 8, "the history once, then the two new changes: {stream:?}");
    assert_eq!(stream[..6], imported[..], "the history first, in its stored order");
    let sent: Vec<String> =
        receiver.requests().iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect();
    let unique: BTreeSet<&String> = sent.iter().collect();
    assert_eq!((sent.len(), unique.len()), (8, 8), "nothing sent twice: {sent:?}");
    for i in &instances {
        let mut theirs = i.event_ids(&ws);
        theirs.sort();
        let mut all = stream.clone();
        all.sort();
        assert_eq!(theirs, all, "instance {} shows the whole trail", i.name);
        let out = i.run(&ws, &["verify"]);
        assert!(out.status.success(), "verify on {}: {}{}", i.name, stdout(&out), stderr(&out));
    }
}
