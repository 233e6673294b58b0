//! Process metrics read from `/proc/self` at scrape time: open and maximum file descriptors,
//! resident and virtual memory, CPU time and threads. Nothing is sampled in the background; a
//! value that cannot be read is left out of that scrape rather than reported as zero.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Registered once in the root registry; reads `/proc/self` on every encode.
#[derive(Debug)]
pub(super) struct ProcessCollector;

/// The fields of `/proc/self/stat` we export.
#[derive(Debug, PartialEq)]
struct ProcStat {
    cpu_ticks: u64,
    threads: i64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state): field n is at index n - 3.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        cpu_ticks: field(14)? + field(15)?,
        threads: i64::try_from(field(20)?).ok()?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

fn open_fds() -> Option<i64> {
    let count = std::fs::read_dir("/proc/self/fd").ok()?.count();
    i64::try_from(count).ok()
}

fn max_fds() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 {
        return None;
    }
    i64::try_from(limit.rlim_cur).ok()
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf has no memory effects.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(fds) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors.",
                fds,
            )?;
        }
        if let Some(fds) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum open file descriptors.",
                fds,
            )?;
        }
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        let Some(stat) = stat else {
            return Ok(());
        };
        if let Some(ticks_per_second) = sysconf(libc::_SC_CLK_TCK) {
            let seconds = stat.cpu_ticks as f64 / ticks_per_second as f64;
            let metric = ConstCounter::new(seconds);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                None,
                metric.metric_type(),
            )?)?;
        }
        if let Some(page_size) = sysconf(libc::_SC_PAGESIZE) {
            let bytes = stat.resident_pages.saturating_mul(page_size);
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            )?;
        }
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            i64::try_from(stat.virtual_bytes).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "OS threads in the process.",
            stat.threads,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a ')' must not shift the fields.
        let line = "4242 (zt (und) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 0 0 20 0 7 0 12345 104857600 2560 18446744073709551615";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                cpu_ticks: 200,
                threads: 7,
                virtual_bytes: 104_857_600,
                resident_pages: 2560,
            }
        );
    }

    #[test]
    fn truncated_stat_is_rejected() {
        assert_eq!(parse_stat("4242 (ztund) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }
}
