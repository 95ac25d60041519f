//! The checks: every client's records against the streams as stored. Each check counts its
//! violations and keeps a few samples; the JSON object holds every figure of the run.

use std::collections::{BTreeMap, HashMap, HashSet};

use chat_relay::protocol::StreamId;
use serde_json::{json, Value};

use crate::client::{ClientState, Shared};
use crate::drive::Ctx;
use crate::mirror::{llm_turns, Mirror};
use crate::{lock, SAMPLES};

#[derive(Debug, Default)]
pub struct Report {
    pub json: serde_json::Map<String, Value>,
    pub violations: Vec<String>,
    pub details: Vec<String>,
}

impl Report {
    pub fn build(
        ctx: &Ctx,
        clients: &[Shared],
        mirrors: &[Mirror],
        tails: &[Option<StreamId>],
        lagging: &[usize],
        pending: Option<Value>,
    ) -> Report {
        let mut r = Report::default();
        let prefix = format!("{}-", ctx.run);

        // Streams: our messages by cid.
        let mut by_cid: HashMap<&str, Vec<(usize, StreamId)>> = HashMap::new();
        let mut stream_chat = 0u64;
        for (room, m) in mirrors.iter().enumerate() {
            for e in &m.entries {
                if e.event != "chat.message" {
                    continue;
                }
                if let Some(cid) = e.cid.as_deref().filter(|c| c.starts_with(&prefix)) {
                    stream_chat += 1;
                    by_cid.entry(cid).or_default().push((room, e.id));
                }
            }
        }
        let stored_twice: Vec<String> = by_cid
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(c, v)| {
                let ids: Vec<String> = v.iter().map(|(_, i)| i.to_string()).collect();
                format!("{c} stored as {}", ids.join(", "))
            })
            .collect();

        // Clients.
        let (mut sent, mut transmissions, mut resent, mut acked, mut never_acked) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut dup_acks, mut delivered_total) = (0u64, 0u64);
        let mut delivered: Vec<u64> = Vec::new();
        let mut acked_missing: Vec<String> = Vec::new();
        let mut acked_cids: HashSet<String> = HashSet::new();
        let mut cid_conflicts: Vec<String> = Vec::new();
        let mut rejected: Vec<String> = Vec::new();
        let mut dup_conn: Vec<String> = Vec::new();
        let mut dup_across: Vec<String> = Vec::new();
        let mut order: Vec<String> = Vec::new();
        let mut gaps: Vec<String> = Vec::new();
        let mut gap_count = 0u64;
        let mut phantom: Vec<String> = Vec::new();
        let mut resume_gaps: Vec<String> = Vec::new();
        let (mut n_dup_conn, mut n_dup_across, mut n_order, mut n_phantom) =
            (0u64, 0u64, 0u64, 0u64);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
        let (mut connects, mut connect_failures, mut llm_deltas) = (0u64, 0u64, 0u64);
        let mut unavailable_but_stored: Vec<String> = Vec::new();
        let mut gap_clients: Vec<usize> = Vec::new();
        let mut turn_breaks: Vec<String> = Vec::new();
        let (mut turns_rebuilt, mut completed_by_final) = (0u64, 0u64);
        for c in clients {
            let s = lock(c);
            turns_rebuilt += s.turns.rebuilt;
            completed_by_final += s.turns.completed_by_final;
            turn_breaks.extend(
                s.turns
                    .violations
                    .iter()
                    .map(|v| format!("client {}: {v}", s.idx)),
            );
            let m = &mirrors[s.room];
            sent += s.next_seq;
            transmissions += s.transmissions;
            resent += s.resent;
            acked += s.acked.len() as u64;
            never_acked += s.unacked.len() as u64;
            dup_acks += s.dup_acks;
            delivered_total += s.delivered;
            delivered.push(s.delivered);
            connects += s.connects;
            connect_failures += s.connect_failures;
            llm_deltas += s.llm_deltas;
            for (k, v) in &s.errors {
                *errors.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &s.refusals {
                *refusals.entry(k.clone()).or_default() += v;
            }
            for (seq, id) in &s.acked {
                let cid = ClientState::cid(&ctx.run, s.idx, *seq);
                let ok = m
                    .ids
                    .get(id)
                    .is_some_and(|&i| m.entries[i].cid.as_deref() == Some(cid.as_str()));
                if !ok {
                    acked_missing.push(format!("client {} {cid} acked as {id} ({})", s.idx, s.sid));
                }
                acked_cids.insert(cid);
            }
            cid_conflicts.extend(s.cid_conflicts.iter().cloned());
            unavailable_but_stored.extend(s.unavailable_but_stored.iter().cloned());
            rejected.extend(
                s.rejected
                    .iter()
                    .map(|(q, code)| format!("client {} seq {q}: {code}", s.idx)),
            );
            n_dup_conn += s.dup_in_conn.len() as u64;
            n_dup_across += s.dup_across.len() as u64;
            n_order += s.order.len() as u64;
            for (conn, id) in &s.dup_in_conn {
                dup_conn.push(format!("client {} conn {conn}: {id} twice", s.idx));
            }
            for (conn, id) in &s.dup_across {
                dup_across.push(format!(
                    "client {} conn {conn}: {id} already received on an earlier connection",
                    s.idx
                ));
            }
            for (conn, last, id) in &s.order {
                order.push(format!("client {} conn {conn}: {id} after {last}", s.idx));
            }
            for g in &s.resume_gaps {
                resume_gaps.push(format!("client {}: {g}", s.idx));
            }
            // Gaps: every stored entry after its first received one, up to the tail.
            if let (Some(first), Some(tail)) = (s.first, tails[s.room]) {
                let missing: Vec<StreamId> = m
                    .entries
                    .iter()
                    .filter(|e| e.id > first && e.id <= tail && !s.seen.contains(&e.id))
                    .map(|e| e.id)
                    .collect();
                if !missing.is_empty() {
                    gap_count += missing.len() as u64;
                    gap_clients.push(s.idx);
                    let shown: Vec<String> = missing
                        .iter()
                        .take(SAMPLES)
                        .map(|i| i.to_string())
                        .collect();
                    gaps.push(format!(
                        "client {} ({} on node {}): {} entries missing, e.g. {}",
                        s.idx,
                        s.sid,
                        s.home + 1,
                        missing.len(),
                        shown.join(", ")
                    ));
                }
            }
            for id in &s.seen {
                if !m.ids.contains_key(id) && m.cursor.is_some_and(|c| *id <= c) {
                    n_phantom += 1;
                    if phantom.len() < SAMPLES {
                        phantom.push(format!("client {}: received {id}, not in {}", s.idx, s.sid));
                    }
                }
            }
        }
        let stored_unacked = by_cid.keys().filter(|c| !acked_cids.contains(**c)).count();

        // LLM.
        let (asked, finals) = llm_turns(&ctx.run, mirrors);
        let asked_total: usize = asked.iter().map(Vec::len).sum();
        let mut asked_acked = 0usize;
        let mut once = 0u64;
        let mut unanswered: Vec<String> = Vec::new();
        let mut twice: Vec<String> = Vec::new();
        let mut asked_set: HashSet<(usize, StreamId)> = HashSet::new();
        let mut llm_codes: BTreeMap<String, u64> = BTreeMap::new();
        let mut llm_reasons: BTreeMap<String, u64> = BTreeMap::new();
        for (room, ids) in asked.iter().enumerate() {
            let m = &mirrors[room];
            for id in ids {
                asked_set.insert((room, *id));
                if m.ids
                    .get(id)
                    .and_then(|&i| m.entries[i].cid.as_deref())
                    .is_some_and(|c| acked_cids.contains(c))
                {
                    asked_acked += 1;
                }
                match finals.get(&(room, *id)).map(Vec::as_slice) {
                    None | Some([]) => unanswered.push(format!("{} turn {id}", ctx.sid(room))),
                    Some([i]) => {
                        once += 1;
                        let e = &m.entries[*i];
                        if e.event == "llm.error" {
                            *llm_codes
                                .entry(e.code.clone().unwrap_or_default())
                                .or_default() += 1;
                        } else {
                            *llm_reasons
                                .entry(e.reason.clone().unwrap_or_default())
                                .or_default() += 1;
                        }
                    }
                    Some(many) => {
                        let ids: Vec<String> = many
                            .iter()
                            .map(|&i| format!("{} {}", m.entries[i].event, m.entries[i].id))
                            .collect();
                        twice.push(format!(
                            "{} turn {id}: {} final entries ({})",
                            ctx.sid(room),
                            many.len(),
                            ids.join(", ")
                        ));
                    }
                }
            }
        }
        let unexpected = finals.keys().filter(|k| !asked_set.contains(k)).count();

        let d_min = delivered.iter().copied().min().unwrap_or(0);
        let d_max = delivered.iter().copied().max().unwrap_or(0);
        let mut checks: Vec<(&str, u64, &Vec<String>)> = vec![
            (
                "acked_but_missing",
                acked_missing.len() as u64,
                &acked_missing,
            ),
            ("stored_twice", stored_twice.len() as u64, &stored_twice),
            ("cid_conflicts", cid_conflicts.len() as u64, &cid_conflicts),
            ("duplicates_in_connection", n_dup_conn, &dup_conn),
            ("duplicates_across_resume", n_dup_across, &dup_across),
            ("order_violations", n_order, &order),
            ("gaps", gap_count, &gaps),
            ("phantom_deliveries", n_phantom, &phantom),
            ("resume_gap_frames", resume_gaps.len() as u64, &resume_gaps),
            ("llm_unanswered", unanswered.len() as u64, &unanswered),
            ("llm_answered_twice", twice.len() as u64, &twice),
            ("rejected", rejected.len() as u64, &rejected),
        ];
        let never_acked_list: Vec<String> = clients
            .iter()
            .flat_map(|c| {
                let s = lock(c);
                s.unacked
                    .values()
                    .take(3)
                    .map(|p| format!("{} ({} sends)", p.cid, p.sends))
                    .collect::<Vec<_>>()
            })
            .take(SAMPLES)
            .collect();
        let lagging_list: Vec<String> = lagging
            .iter()
            .map(|i| {
                let s = lock(&clients[*i]);
                format!(
                    "client {} ({}): last {} < tail {}",
                    s.idx,
                    s.sid,
                    s.last.map_or("-".into(), |l| l.to_string()),
                    tails[s.room].map_or("-".into(), |t| t.to_string())
                )
            })
            .collect();
        checks.push((
            "llm_catch_up_broken",
            turn_breaks.len() as u64,
            &turn_breaks,
        ));
        checks.push(("never_acked", never_acked, &never_acked_list));
        checks.push(("clients_behind_tail", lagging.len() as u64, &lagging_list));

        for (name, n, samples) in &checks {
            r.json.insert((*name).into(), json!(n));
            if *n > 0 {
                r.violations.push(format!("{name}={n}"));
                for s in samples.iter().take(SAMPLES) {
                    r.details.push(format!("{name}: {s}"));
                }
            }
        }
        // Connection histories of the clients with gaps or duplicates, to read with relay logs.
        let mut suspects: Vec<usize> = gap_clients;
        for c in clients {
            let s = lock(c);
            if !s.dup_in_conn.is_empty() || !s.dup_across.is_empty() || !s.order.is_empty() {
                suspects.push(s.idx);
            }
        }
        suspects.sort_unstable();
        suspects.dedup();
        for i in suspects.iter().take(3) {
            let s = lock(&clients[*i]);
            for rec in &s.conns {
                r.details.push(format!(
                    "client {} conn {} node {} resume_from {} t {:.1}..{} first {} last {} delivered {} end {}",
                    s.idx,
                    rec.no,
                    rec.node + 1,
                    rec.resume_from.map_or("-".into(), |x| x.to_string()),
                    rec.t_start,
                    rec.t_end.map_or("-".into(), |t| format!("{t:.1}")),
                    rec.first.map_or("-".into(), |x| x.to_string()),
                    rec.last.map_or("-".into(), |x| x.to_string()),
                    rec.delivered,
                    rec.end
                ));
            }
        }

        let j = &mut r.json;
        j.insert("run".into(), json!(ctx.run));
        j.insert("rooms".into(), json!(ctx.args.rooms));
        j.insert("clients".into(), json!(clients.len()));
        j.insert("nodes".into(), json!(ctx.args.nodes.len()));
        j.insert("sent".into(), json!(sent));
        j.insert("transmissions".into(), json!(transmissions));
        j.insert("resent".into(), json!(resent));
        j.insert("acked".into(), json!(acked));
        j.insert("duplicate_acks".into(), json!(dup_acks));
        j.insert("stored".into(), json!(by_cid.len()));
        j.insert("stored_entries".into(), json!(stream_chat));
        j.insert("stored_unacked".into(), json!(stored_unacked));
        j.insert("delivered_total".into(), json!(delivered_total));
        j.insert("delivered_min".into(), json!(d_min));
        j.insert("delivered_max".into(), json!(d_max));
        j.insert("delivered_per_client".into(), json!(delivered));
        j.insert("connects".into(), json!(connects));
        j.insert(
            "reconnects".into(),
            json!(connects.saturating_sub(clients.len() as u64)),
        );
        j.insert("connect_failures".into(), json!(connect_failures));
        j.insert("connect_refusals".into(), json!(refusals));
        j.insert("errors".into(), json!(errors));
        j.insert(
            "store_unavailable_but_stored".into(),
            json!(unavailable_but_stored.len()),
        );
        for d in unavailable_but_stored.iter().take(SAMPLES) {
            r.details
                .push(format!("info: store_unavailable_but_stored: {d}"));
        }
        j.insert("llm_asked".into(), json!(asked_total));
        j.insert("llm_asked_acked".into(), json!(asked_acked));
        j.insert("llm_answered_once".into(), json!(once));
        j.insert("llm_error_codes".into(), json!(llm_codes));
        j.insert("llm_response_reasons".into(), json!(llm_reasons));
        j.insert("llm_finals_for_other_turns".into(), json!(unexpected));
        j.insert("llm_deltas_seen".into(), json!(llm_deltas));
        j.insert("llm_replies_rebuilt".into(), json!(turns_rebuilt));
        j.insert(
            "llm_replies_completed_by_final".into(),
            json!(completed_by_final),
        );
        if let Some(p) = pending {
            j.insert("llm_group_pending".into(), p);
        }
        j.insert(
            "stream_lengths".into(),
            json!(mirrors.iter().map(|m| m.entries.len()).collect::<Vec<_>>()),
        );
        j.insert("violations".into(), json!(r.violations));
        j.insert("ok".into(), json!(r.violations.is_empty()));
        r
    }
}
