//! 32-byte secret keys kept in the state directory (mode 0600), made on first use.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

/// Reads the key at `path`, or creates it with fresh random bytes. A key file
/// that is not exactly 32 bytes, or that group or others can read, is an error:
/// a key that may have leaked must not be used silently.
pub fn load_or_create(path: &Path) -> io::Result<[u8; 32]> {
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(io::Error::other(format!(
                    "{} is readable by group or others (mode {:o})",
                    path.display(),
                    mode & 0o777
                )));
            }
            bytes
                .try_into()
                .map_err(|_| io::Error::other(format!("{} is not a 32-byte key", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).map_err(|e| io::Error::other(e.to_string()))?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&key)?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reads_the_same_key() {
        let dir = std::env::temp_dir().join(format!("ag-key-{}", std::process::id()));
        let path = dir.join("k.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&path).is_err(),
            "a world-readable key is refused"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
