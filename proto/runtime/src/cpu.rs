//! CPU time used by this process, or by its threads of one name, read from
//! Linux `/proc` (the benchmarks report CPU beside wall time with it).
//! `None` where `/proc` is not there.

use std::time::Duration;

/// `/proc` counts in USER_HZ, which Linux fixes at 100 per second.
const TICK: Duration = Duration::from_millis(10);

/// User + system CPU time of this process so far (every thread).
pub fn process() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(TICK * u32::try_from(stat_ticks(&stat)?.1).ok()?)
}

/// User + system CPU time of this process's threads named `name`, living
/// ones only (a thread that ended is no longer counted).
pub fn threads(name: &str) -> Option<Duration> {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("stat")) else {
            continue;
        };
        if let Some((comm, t)) = stat_ticks(&stat)
            && comm == name
        {
            ticks += t;
        }
    }
    Some(TICK * u32::try_from(ticks).ok()?)
}

/// From one `stat` line: the command name and utime + stime in ticks (the
/// 14th and 15th fields; the name is parenthesised and may hold spaces, so
/// fields are counted after its closing parenthesis).
fn stat_ticks(stat: &str) -> Option<(&str, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let mut fields = stat.get(close + 2..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((&stat[open + 1..close], utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_spaces_and_parentheses_are_skipped_over() {
        let line = "42 (audit writer (2)) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0";
        assert_eq!(stat_ticks(line), Some(("audit writer (2)", 281)));
        assert_eq!(stat_ticks("42 (x"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(process().is_some_and(|d| d > Duration::ZERO));
    }
}
