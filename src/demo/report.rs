//! What the demo prints: the table of flows, and one line per node with where its metrics are
//! and a few numbers read from them.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::scenario;
use super::traffic::Row;
use super::world::World;
use crate::topology::Place;

const HEADERS: [&str; 5] = [
    "from → to",
    "path",
    "identity the server saw",
    "bytes",
    "result",
];

/// The table, columns padded to their widest cell (counted in characters, not bytes).
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.from_to.as_str(),
                r.path.as_str(),
                r.identity.as_str(),
                r.bytes.as_str(),
                r.result.as_str(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |row: &[&str; 5], mark: &str| {
        let mut text = String::from(mark);
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            text += cell;
            if i + 1 < row.len() {
                text += &" ".repeat(width - cell.chars().count());
                text += " | ";
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(&HEADERS, "  ");
    for (row, data) in cells.iter().zip(rows) {
        out += &line(row, if data.as_expected { "  " } else { "! " });
    }
    out
}

/// One line per node: where its metrics are served and what they counted; with `hold`, also
/// how to read them while the topology stays up.
pub async fn metrics_lines(world: &World, hold: bool) -> String {
    let mut out = String::new();
    for daemon in &world.daemons {
        let n = daemon.node;
        let text = fetch_metrics(world, n).await.unwrap_or_default();
        let counted = if text.is_empty() {
            "unreachable".to_string()
        } else {
            format!(
                "{} pod proxies, {} connections opened, {} policy denials",
                sum(&text, "workload_manager_active_proxy_count"),
                sum(&text, "istio_tcp_connections_opened_total"),
                sum(&text, "ztund_policy_denials_total"),
            )
        };
        out += &format!(
            "{} metrics at http://{}:15020/metrics: {counted}",
            scenario::node_name(n),
            world.topology.node_ip(n),
        );
        if hold {
            out += &format!(
                " (ip netns exec {} curl -s localhost:15020/metrics)",
                world.topology.netns_name(Place::Node(n))
            );
        }
        out.push('\n');
    }
    out
}

async fn fetch_metrics(world: &World, n: usize) -> Option<String> {
    let sockets = world.topology.app_sockets(Place::Node(n)).ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let mut stream = sockets.connect(addr, None).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ztund\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    Some(answer)
}

/// The sum of every sample of metric `name` (all label sets).
fn sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(from_to: &str, result: &str, as_expected: bool) -> Row {
        Row {
            from_to: from_to.into(),
            path: "HBONE node1→node2".into(),
            identity: "spiffe://cluster.local/ns/default/sa/sleep".into(),
            bytes: "28/28".into(),
            result: result.into(),
            as_expected,
        }
    }

    #[test]
    fn columns_line_up_and_unexpected_rows_are_marked() {
        let text = table(&[
            row("sleep → echo:8080", "ok", true),
            row(
                "httpbin → db:5432",
                "denied by AuthorizationPolicy x/y",
                false,
            ),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let bar = |l: &str| l.chars().position(|c| c == '|');
        assert_eq!(bar(lines[0]), bar(lines[1]));
        assert_eq!(bar(lines[1]), bar(lines[2]));
        assert!(lines[1].starts_with("  sleep"));
        assert!(lines[2].starts_with("! httpbin"));
    }

    #[test]
    fn metric_sums_cover_every_label_set_and_only_that_metric() {
        let text = "# TYPE x counter\nistio_tcp_connections_opened_total{a=\"1\"} 2\n\
                    istio_tcp_connections_opened_total{a=\"2\"} 3\n\
                    istio_tcp_connections_opened_total_other 9\n";
        assert_eq!(sum(text, "istio_tcp_connections_opened_total"), 5);
        assert_eq!(sum(text, "absent"), 0);
    }
}
