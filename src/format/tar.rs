//! A sans-IO reader of the tar stream `BASE_BACKUP` sends (ustar, as `tarCreateHeader` in
//! `src/port/tar.c` writes it; GNU long names and base-256 sizes accepted). Feed it bytes in any
//! chunking; it reports each entry's header, its content in pieces, and its end.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other(u8),
}

#[derive(Debug, PartialEq, Eq)]
pub enum TarEvent<'a> {
    Entry {
        path: String,
        size: u64,
        kind: EntryKind,
        link: String,
        /// Permission bits (`mode` field).
        mode: u32,
    },
    Data(&'a [u8]),
    EntryEnd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed tar stream: {0}")]
pub struct TarError(pub String);

#[derive(Debug, Default)]
pub struct TarReader {
    hdr: Vec<u8>,
    /// Content bytes left in the current entry.
    remaining: u64,
    /// Padding bytes left after the current entry's content.
    padding: u64,
    in_entry: bool,
    /// A GNU long name ('L') being collected, then applied to the next header.
    long_name: Option<Vec<u8>>,
    collecting_long_name: bool,
    ended: bool,
}

fn octal_or_base256(field: &[u8]) -> Result<u64, TarError> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v
                .checked_shl(8)
                .ok_or_else(|| TarError("size overflows".into()))?
                | *b as u64;
        }
        return Ok(v);
    }
    let s: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect::<String>()
        .trim()
        .to_string();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(&s, 8).map_err(|_| TarError(format!("bad octal number {s:?}")))
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl TarReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the end-of-archive zero block was seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// True when the stream stopped at an entry boundary (complete, possibly without end blocks).
    pub fn at_boundary(&self) -> bool {
        !self.in_entry && self.padding == 0 && self.hdr.is_empty() && !self.collecting_long_name
    }

    pub fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut dyn FnMut(TarEvent<'_>) -> Result<(), TarError>,
    ) -> Result<(), TarError> {
        while !data.is_empty() {
            if self.ended {
                // Anything after the end marker must be zero padding.
                if data.iter().any(|b| *b != 0) {
                    return Err(TarError("data after the end of the archive".into()));
                }
                return Ok(());
            }
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(data.len());
                if self.collecting_long_name {
                    self.long_name
                        .get_or_insert_with(Vec::new)
                        .extend_from_slice(&data[..n]);
                } else {
                    on(TarEvent::Data(&data[..n]))?;
                }
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.in_entry {
                self.in_entry = false;
                if self.collecting_long_name {
                    self.collecting_long_name = false;
                } else {
                    on(TarEvent::EntryEnd)?;
                }
            }
            if self.padding > 0 {
                let n = (self.padding as usize).min(data.len());
                self.padding -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (512 - self.hdr.len()).min(data.len());
            self.hdr.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.hdr.len() < 512 {
                continue;
            }
            let h = std::mem::take(&mut self.hdr);
            if h.iter().all(|b| *b == 0) {
                self.ended = true;
                continue;
            }
            self.header(&h, on)?;
        }
        // An entry whose content ended exactly at the end of this chunk.
        if self.in_entry && self.remaining == 0 && !self.collecting_long_name {
            self.in_entry = false;
            on(TarEvent::EntryEnd)?;
        }
        Ok(())
    }

    fn header(
        &mut self,
        h: &[u8],
        on: &mut dyn FnMut(TarEvent<'_>) -> Result<(), TarError>,
    ) -> Result<(), TarError> {
        let stored: u64 = octal_or_base256(&h[148..156])?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        if stored != sum {
            return Err(TarError(format!(
                "header checksum {stored} does not match {sum}"
            )));
        }
        let size = octal_or_base256(&h[124..136])?;
        let typeflag = h[156];
        self.in_entry = true;
        self.remaining = size;
        self.padding = (512 - size % 512) % 512;
        if typeflag == b'L' {
            self.collecting_long_name = true;
            self.long_name = Some(Vec::new());
            return Ok(());
        }
        let mut path = match self.long_name.take() {
            Some(n) => cstr(&n),
            None => {
                let name = cstr(&h[0..100]);
                let prefix = if &h[257..262] == b"ustar" {
                    cstr(&h[345..500])
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let kind = match typeflag {
            b'0' | 0 => EntryKind::File,
            b'5' => EntryKind::Directory,
            b'2' => EntryKind::Symlink,
            t => EntryKind::Other(t),
        };
        if kind == EntryKind::Directory {
            while path.ends_with('/') {
                path.pop();
            }
        }
        on(TarEvent::Entry {
            path,
            size,
            kind,
            link: cstr(&h[157..257]),
            mode: (octal_or_base256(&h[100..108])? & 0o7777) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar with the system's tar, reads it in awkward chunk sizes.
    #[test]
    fn reads_what_tar_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        std::fs::create_dir_all(root.join("base/1")).unwrap();
        std::fs::write(root.join("PG_VERSION"), "15\n").unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.join("base/1/16384"), &big).unwrap();
        let long = "d".repeat(120);
        std::fs::write(root.join(&long), "long name").unwrap();
        std::fs::write(root.join("empty"), "").unwrap();
        let tar = dir.path().join("t.tar");
        let st = std::process::Command::new("tar")
            .args(["--format=gnu", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(&root)
            .args(["PG_VERSION", "base", &long, "empty"])
            .status()
            .unwrap();
        assert!(st.success());
        let bytes = std::fs::read(&tar).unwrap();
        for chunk in [1usize, 100, 511, 512, 513, 65536] {
            let mut r = TarReader::new();
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            let mut dirs = Vec::new();
            let mut cur: Option<(String, Vec<u8>)> = None;
            for c in bytes.chunks(chunk) {
                r.feed(c, &mut |e| {
                    match e {
                        TarEvent::Entry {
                            path,
                            kind: EntryKind::File,
                            ..
                        } => cur = Some((path, Vec::new())),
                        TarEvent::Entry {
                            path,
                            kind: EntryKind::Directory,
                            ..
                        } => dirs.push(path),
                        TarEvent::Entry { .. } => {}
                        TarEvent::Data(d) => cur.as_mut().unwrap().1.extend_from_slice(d),
                        TarEvent::EntryEnd => {
                            if let Some(f) = cur.take() {
                                files.push(f)
                            }
                        }
                    }
                    Ok(())
                })
                .unwrap();
            }
            assert!(r.ended(), "chunk {chunk}");
            let get = |p: &str| files.iter().find(|f| f.0 == p).map(|f| f.1.clone());
            assert_eq!(get("PG_VERSION").unwrap(), b"15\n", "chunk {chunk}");
            assert_eq!(get("base/1/16384").unwrap(), big, "chunk {chunk}");
            assert_eq!(get(&long).unwrap(), b"long name", "chunk {chunk}");
            assert_eq!(get("empty").unwrap(), b"", "chunk {chunk}");
            assert!(dirs.contains(&"base".to_string()) && dirs.contains(&"base/1".to_string()));
        }
        // A damaged header is refused.
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        let mut r = TarReader::new();
        assert!(r.feed(&bad, &mut |_| Ok(())).is_err());
    }
}
