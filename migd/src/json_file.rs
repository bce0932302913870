//! JSON files written whole or not at all.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use serde::Serialize;

/// Writes JSON to a temporary name of its own in the same directory, then renames it
/// into place and syncs the directory. Concurrent writers of one path (threads or
/// processes) each write their own file: the last rename wins, whole.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let body = serde_json::to_vec_pretty(value)?;
    let mut tmp = None;
    let mut write = || -> std::io::Result<()> {
        let (mut f, t) = create_temp(path)?;
        let t = tmp.insert(t);
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&*t, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        if let Some(t) = &tmp {
            let _ = std::fs::remove_file(t);
        }
        anyhow::anyhow!("writing {}: {e}", path.display())
    })
}

/// Creates `<path>.tmp.<pid>.<n>` beside `path`, `n` a process-wide counter: new,
/// never an existing file (a leftover under that name makes it take the next `n`).
fn create_temp(path: &Path) -> std::io::Result<(File, PathBuf)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut tries = 0;
    loop {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp.{}.{seq}", std::process::id()));
        let tmp = path.with_file_name(name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write_json_atomic;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn concurrent_writers_of_one_path_leave_valid_json() {
        let dir = std::env::temp_dir().join(format!("migd-json-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.json");
        let done = AtomicBool::new(false);
        // One writer's document: its letter, the count, a long pad of the letter.
        let whole = |v: &Value| {
            let w = v["writer"].as_str().unwrap_or("?");
            v["pad"]
                .as_str()
                .is_some_and(|p| p.len() == 8192 && p.chars().all(|c| c.to_string() == w))
        };
        let (errors, torn) = std::thread::scope(|s| {
            let writers: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|w| {
                    let path = &path;
                    s.spawn(move || {
                        (0..200)
                            .filter_map(|i| {
                                let v = json!({"writer": w, "i": i, "pad": w.repeat(8192)});
                                write_json_atomic(path, &v).err().map(|e| format!("{e:#}"))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let reader = s.spawn(|| {
                let mut torn = Vec::new();
                while !done.load(Ordering::Relaxed) && torn.is_empty() {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        if !serde_json::from_str(&text).is_ok_and(|v| whole(&v)) {
                            torn.push(text);
                        }
                    }
                }
                torn
            });
            let errors: Vec<String> = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect();
            done.store(true, Ordering::Relaxed);
            (errors, reader.join().unwrap_or_default())
        });
        assert!(errors.is_empty(), "failed writes: {:?}", &errors[..1]);
        assert!(torn.is_empty(), "a torn file: {:.200}", torn[0]);
        let last: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(whole(&last) && last["i"] == 199, "{last:.200}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["job.json"], "temporary files left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
