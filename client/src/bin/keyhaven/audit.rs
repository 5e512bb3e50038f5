//! `keyhaven audit tail|verify|export|public-key` and the times they take.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyhaven::wire::{AuditExport, AuditRead, AuditRecord, AuditVerify};
use keyhaven::Client;

use crate::Failure;

/// Parses `--since`: Unix seconds (`1767225600`), an age (`90s`, `15m`,
/// `2h`, `7d`), or a UTC date or time (`2026-01-01`, `2026-01-01T12:00:00Z`).
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid time `{}`: use Unix seconds, an age like 15m, 2h or 7d, or 2026-01-31[T12:00:00Z]",
            s.chars().take(40).collect::<String>()
        )
    };
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        let mult = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => 86400,
        };
        return Ok(now.saturating_sub(n.saturating_mul(mult)));
    }
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |p: &str| p.parse::<i64>().map_err(|_| bad());
    let dp: Vec<&str> = date.split('-').collect();
    let [y, m, d] = dp.as_slice() else { return Err(bad()) };
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86400;
    if let Some(t) = time {
        let tp: Vec<&str> = t.split(':').collect();
        let [h, mi, se] = tp.as_slice() else { return Err(bad()) };
        let (h, mi, se) = (num(h)?, num(mi)?, num(se)?);
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&se) {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + se;
    }
    u64::try_from(secs).map_err(|_| bad())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of Unix milliseconds.
pub fn format_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

/// One record on one line, for people.
fn human(r: &AuditRecord) -> String {
    let mut line = format!("{} #{} uid={}", format_ms(r.time_ms), r.seq, r.caller.uid);
    if let Some(u) = &r.caller.user {
        line += &format!("({u})");
    }
    if let Some(p) = r.caller.pid {
        line += &format!(" pid={p}");
    }
    if let Some(a) = &r.actor {
        line += &format!(" actor={a}");
    }
    line += &format!(" {}", r.op);
    match (&r.tenant, &r.key) {
        (Some(t), Some(k)) => line += &format!(" {t}/{k}"),
        (Some(t), None) => line += &format!(" {t}"),
        _ => {}
    }
    if let Some(v) = r.version {
        line += &format!(" v{v}");
    }
    if let Some(e) = &r.envelope_id {
        line += &format!(" envelope={e}");
    }
    if !r.context_keys.is_empty() {
        line += &format!(" context=[{}]", r.context_keys.join(","));
    }
    line += &format!(" {}", r.outcome);
    if let Some(c) = &r.code {
        line += &format!(" ({c})");
    }
    if let Some(d) = &r.detail {
        line += &format!(": {d}");
    }
    if let Some(why) = &r.reason {
        line += &format!(" (reason: {why})");
    }
    line
}

fn print(records: &[AuditRecord], json: bool, skip_own_reads: bool) -> Result<(), Failure> {
    let records: Vec<(Option<&str>, &AuditRecord)> = records.iter().map(|r| (None, r)).collect();
    print_labelled(&records, json, skip_own_reads)
}

/// Prints records, each labelled (when it has a label) with the node whose
/// chain it is on: `[node] ` before a line of text, a `node` field in JSON.
fn print_labelled(
    records: &[(Option<&str>, &AuditRecord)],
    json: bool,
    skip_own_reads: bool,
) -> Result<(), Failure> {
    let me = std::process::id() as i32;
    let mut out = std::io::stdout().lock();
    for (node, r) in records {
        // `tail -f` polls; its own reads would otherwise fill the screen.
        if skip_own_reads && r.op == "audit_read" && r.caller.pid == Some(me) {
            continue;
        }
        match (json, node) {
            (true, None) => {
                writeln!(out, "{}", serde_json::to_string(r).map_err(|e| Failure::new(e.to_string()))?)?
            }
            (true, Some(node)) => {
                let mut value = serde_json::to_value(r).map_err(|e| Failure::new(e.to_string()))?;
                if let Some(object) = value.as_object_mut() {
                    object.insert("node".into(), serde_json::Value::String((*node).to_owned()));
                }
                writeln!(out, "{value}")?
            }
            (false, None) => writeln!(out, "{}", human(r))?,
            (false, Some(node)) => writeln!(out, "[{node}] {}", human(r))?,
        }
    }
    out.flush()?;
    Ok(())
}

/// Whose audit records `audit tail` follows (docs/CLUSTER.md §3).
pub enum Nodes {
    /// The answering node's (the only log of a daemon on sled).
    This,
    /// One node's chain of a cluster (`--node`), labelled with its name.
    One(String),
    /// Every node's chain of a cluster (`--all-nodes`), labelled.
    All,
}

/// Merges chains' records into time order, each chain's records staying in
/// its own order (a clock set back on one node does not reorder its chain);
/// ties go by node name.
fn merge(mut chains: Vec<(String, std::collections::VecDeque<AuditRecord>)>) -> Vec<(String, AuditRecord)> {
    chains.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    loop {
        let next = chains
            .iter()
            .enumerate()
            .filter_map(|(i, (_, records))| records.front().map(|r| (r.time_ms, i)))
            .min();
        let Some((_, i)) = next else { return out };
        let record = chains[i].1.pop_front().expect("a head");
        out.push((chains[i].0.clone(), record));
    }
}

fn print_merged(records: &[(String, AuditRecord)], json: bool, skip_own_reads: bool) -> Result<(), Failure> {
    let labelled: Vec<(Option<&str>, &AuditRecord)> =
        records.iter().map(|(node, r)| (Some(node.as_str()), r)).collect();
    print_labelled(&labelled, json, skip_own_reads)
}

/// How `audit tail -f` connects again after the daemon went away.
pub struct Reconnect {
    /// The socket.
    pub socket: std::path::PathBuf,
    /// Connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Request timeout.
    pub request_timeout: Option<Duration>,
}

impl Reconnect {
    async fn connect(&self) -> Result<Client, keyhaven::Error> {
        Client::builder()
            .connect_timeout(self.connect_timeout)
            .request_timeout(self.request_timeout)
            .connect(&self.socket)
            .await
    }
}

/// Whether `audit tail -f` should connect again and go on after `e`: the
/// daemon went away (stopped, restarting, not yet listening) or is
/// momentarily unable to answer. Any other answer ends it.
fn passing(e: &keyhaven::Error) -> bool {
    use keyhaven::ErrorCode::{Busy, HsmUnavailable, StoreUnavailable};
    match e.code() {
        None => !matches!(e, keyhaven::Error::Protocol(_) | keyhaven::Error::FrameTooLarge(_)),
        Some(code) => matches!(code, Busy | StoreUnavailable | HsmUnavailable),
    }
}

/// What `audit tail` prints first.
pub enum Start {
    /// The last this many matching records (`-n`; 0: none, only new ones).
    Last(u32),
    /// Every matching record after this sequence number (`--after`).
    After(u64),
}

/// `audit tail`: the last records (or those after a sequence number),
/// then (with `follow`) new ones as they come. Following survives the
/// daemon's restarts: it connects again (every 0.5 s, saying so on stderr)
/// and reads on after the last record it read, so that no record is
/// printed twice or left out (docs/AUDIT.md §7).
#[allow(clippy::too_many_arguments)]
pub async fn tail(
    client: Client,
    reconnect: Reconnect,
    tenant: Option<String>,
    since: Option<u64>,
    start: Start,
    follow: bool,
    json: bool,
    nodes: Nodes,
) -> Result<(), Failure> {
    let node = match nodes {
        Nodes::This => None,
        Nodes::One(node) => Some(node),
        Nodes::All => {
            let Start::Last(lines) = start else {
                return Err(Failure::new(
                    "--after names a record of one node's chain: use it with --node, or --since with --all-nodes"
                        .into(),
                ));
            };
            return tail_all(client, reconnect, tenant, since, lines, follow, json).await;
        }
    };
    let print = |records: &[AuditRecord], json: bool, skip: bool| match &node {
        None => print(records, json, skip),
        Some(n) => {
            let labelled: Vec<(Option<&str>, &AuditRecord)> =
                records.iter().map(|r| (Some(n.as_str()), r)).collect();
            print_labelled(&labelled, json, skip)
        }
    };
    let mut client = client;
    let mut next = match start {
        Start::Last(lines) => {
            let first = client
                .call(&AuditRead {
                    tenant: tenant.clone(),
                    since,
                    after: None,
                    last: Some(lines),
                    raw: false,
                    node: node.clone(),
                })
                .await?;
            print(&first.records, json, false)?;
            // The newest record in the log, matching or not: nothing older
            // is printed from here on.
            first.next
        }
        Start::After(after) => {
            let mut after = after;
            loop {
                let page = client
                    .call(&AuditRead {
                        tenant: tenant.clone(),
                        since,
                        after: Some(after),
                        last: None,
                        raw: false,
                        node: node.clone(),
                    })
                    .await?;
                print(&page.records, json, false)?;
                after = page.next.max(after);
                if !page.more {
                    break after;
                }
            }
        }
    };
    if !follow {
        return Ok(());
    }
    loop {
        let read = AuditRead {
            tenant: tenant.clone(),
            since,
            after: Some(next),
            last: None,
            raw: false,
            node: node.clone(),
        };
        match client.call(&read).await {
            Ok(page) => {
                print(&page.records, json, true)?;
                next = page.next.max(next);
                if !page.more {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(e) if passing(&e) => {
                eprintln!("keyhaven: audit tail: {e}; connecting again to go on after record {next}");
                client = loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match reconnect.connect().await {
                        Ok(c) => break c,
                        Err(e) if passing(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                eprintln!("keyhaven: audit tail: connected again; going on after record {next}");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `audit tail --all-nodes`: every node's chain of a cluster, read through
/// the answering node (each `audit_read` names one chain; each answer lists
/// the chains, so a node that joins is followed from its first record).
/// The last `lines` records of all chains together first; then, every half
/// second, each chain's new records, merged in time order within the round
/// and labelled with their node. A record made durable later than a newer
/// one on another node comes in a later round, so times are ordered within
/// a round, and within a chain always (docs/CLUSTER.md §3).
async fn tail_all(
    client: Client,
    reconnect: Reconnect,
    tenant: Option<String>,
    since: Option<u64>,
    lines: u32,
    follow: bool,
    json: bool,
) -> Result<(), Failure> {
    use std::collections::{BTreeMap, VecDeque};
    let mut client = client;
    let read = |node: Option<String>, after: Option<u64>, last: Option<u32>| AuditRead {
        tenant: tenant.clone(),
        since,
        after,
        last,
        raw: false,
        node,
    };
    let first = client.call(&read(None, None, Some(0))).await?;
    if first.chains.is_empty() {
        return Err(Failure::new(
            "--all-nodes: this daemon's store is not a cluster (it keeps one audit log): leave --all-nodes out".into(),
        ));
    }
    // Each chain's cursor: the `next` to read on from.
    let mut cursors: BTreeMap<String, u64> = BTreeMap::new();
    let mut start = Vec::new();
    for chain in &first.chains {
        let page = client.call(&read(Some(chain.clone()), None, Some(lines))).await?;
        cursors.insert(chain.clone(), page.next);
        start.push((chain.clone(), VecDeque::from(page.records)));
    }
    let merged = merge(start);
    let skip = merged.len().saturating_sub(lines as usize);
    print_merged(&merged[skip..], json, false)?;
    if !follow {
        return Ok(());
    }
    loop {
        let round = async {
            let mut news = Vec::new();
            let mut more = false;
            let chains: Vec<String> = cursors.keys().cloned().collect();
            let mut known = Vec::new();
            for chain in chains {
                let after = cursors[&chain];
                let page = client.call(&read(Some(chain.clone()), Some(after), None)).await?;
                more |= page.more;
                known = page.chains;
                cursors.insert(chain.clone(), page.next.max(after));
                news.push((chain, VecDeque::from(page.records)));
            }
            // A node that joined meanwhile: followed from its first record.
            for chain in known {
                cursors.entry(chain).or_insert(0);
            }
            Ok::<_, keyhaven::Error>((news, more))
        };
        match round.await {
            Ok((news, more)) => {
                print_merged(&merge(news), json, true)?;
                if !more {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(e) if passing(&e) => {
                eprintln!(
                    "keyhaven: audit tail: {e}; connecting again to go on after each chain's last record"
                );
                client = loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match reconnect.connect().await {
                        Ok(c) => break c,
                        Err(e) if passing(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                eprintln!("keyhaven: audit tail: connected again");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `audit export`: every matching record as JSON lines.
pub async fn export(client: &Client, tenant: Option<String>, since: Option<u64>) -> Result<(), Failure> {
    let mut after = 0;
    loop {
        let page = client
            .call(&AuditRead {
                tenant: tenant.clone(),
                since,
                after: Some(after),
                last: None,
                raw: false,
                node: None,
            })
            .await?;
        print(&page.records, true, false)?;
        if !page.more {
            return Ok(());
        }
        after = page.next;
    }
}

/// `audit export --signed`: the records as stored and the seals, JSON lines.
pub async fn export_signed(client: &Client, since: Option<u64>) -> Result<(), Failure> {
    let mut after = None;
    let mut out = std::io::stdout().lock();
    loop {
        let page = client.call(&AuditExport { since, after }).await?;
        for line in &page.lines {
            writeln!(out, "{line}")?;
        }
        if !page.more {
            out.flush()?;
            return Ok(());
        }
        after = Some(page.next);
    }
}

/// `audit verify`: fails (exit 1) when the log is not intact, and exits 3
/// when it is but a start found records no seal covered.
pub async fn verify(client: &Client, json: bool) -> Result<(), Failure> {
    let v = client.call(&AuditVerify {}).await?;
    if json {
        crate::print_json(&v)?;
    }
    let sealed = v.last_sealed.map_or("none".to_owned(), |s| s.to_string());
    let unsealed: Vec<String> = v
        .unsealed
        .iter()
        .map(|u| {
            let range = if u.from == u.to {
                format!("record {}", u.from)
            } else {
                format!("records {} to {}", u.from, u.to)
            };
            format!(
                "{range} (reported unsealed at a start, {}, in record {})",
                format_ms(u.time_ms),
                u.reported_in
            )
        })
        .collect();
    match &v.problem {
        None if !unsealed.is_empty() => Err(Failure {
            message: format!(
                "audit log UNSEALED in part: no problem found, but no seal vouched for {} when the daemon \
                 started: written before a crash, or changed while it was stopped [{} records, {} seals, \
                 last sealed record {sealed}]",
                unsealed.join(", "),
                v.records,
                v.seals
            ),
            exit: 3,
            no: false,
        }),
        None => {
            if !json {
                let kept = match v.first_kept {
                    Some(f) => format!(
                        "; it starts at record {f}: the records before were archived or deleted by \
                         retention (check an archive with `audit verify --archive DIR`)"
                    ),
                    None => String::new(),
                };
                outln!(
                    "audit log intact: {} records, {} seals, last sealed record {sealed}{kept}",
                    v.records,
                    v.seals
                );
            }
            Ok(())
        }
        Some(p) => Err(Failure::no(format!(
            "audit log NOT intact at record {} ({}): {} [{} records, {} seals walked]",
            p.seq, p.kind, p.message, v.records, v.seals
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1767225600").unwrap(), 1767225600);
        assert_eq!(parse_time("2026-01-01").unwrap(), 1767225600);
        assert_eq!(parse_time("2026-01-01T01:02:03Z").unwrap(), 1767225600 + 3723);
        assert_eq!(parse_time("2000-03-01").unwrap(), 951868800);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(now - parse_time("2h").unwrap() >= 7200 && now - parse_time("2h").unwrap() < 7300);
        for bad in ["", "yesterday", "2026-13-01", "2026-01-01T25:00:00Z", "2026-01-01T01:00:00", "5w"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(format_ms(1767225600123 + 3723000), "2026-01-01T01:02:03.123Z");
        assert_eq!(format_ms(951868800000), "2000-03-01T00:00:00.000Z");
    }

    fn record(seq: u64, time_ms: u64) -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "seq": seq, "time_ms": time_ms, "prev": "", "caller": {"uid": 0, "gid": 0}, "op": "x", "outcome": "ok",
        }))
        .unwrap()
    }

    #[test]
    fn chains_merge_in_time_order_each_in_its_own_order() {
        use std::collections::VecDeque;
        // Node b's clock went back between its records 2 and 3: its
        // chain keeps its order; the rest goes by time, ties by node.
        let a = VecDeque::from([record(1, 10), record(2, 30), record(3, 50)]);
        let b = VecDeque::from([record(1, 20), record(2, 40), record(3, 35), record(4, 50)]);
        let merged = merge(vec![("b".into(), b), ("a".into(), a), ("c".into(), VecDeque::new())]);
        let order: Vec<(String, u64)> = merged.iter().map(|(n, r)| (n.clone(), r.seq)).collect();
        let expected = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3), ("b", 4)];
        assert_eq!(order, expected.map(|(n, s)| (n.to_owned(), s)));
    }
}
