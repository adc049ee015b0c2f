//! The state directory: the one owner of every file portferry keeps across restarts
//! (the local CA and certificate, the generated token, the relay's leases).
//!
//! Whoever opens it gets the same guarantees, whatever else is configured:
//! - the directory (and any parent it has to create) is made mode 0700 on unix, and an
//!   existing directory that others may read, write or enter is tightened to 0700;
//! - every file is written mode 0600 and atomically: a temporary file beside it is
//!   written and `fsync`ed, renamed over the old one, then the directory is `fsync`ed,
//!   so that a crash leaves either the old or the new contents, never a torn file.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Mode of the state directory on unix: only its owner may list, enter or change it.
#[cfg(unix)]
const DIR_MODE: u32 = 0o700;
/// Mode of every file in the state directory on unix: only its owner may read or write it.
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;

/// An opened state directory: it exists and only its owner can reach what is in it.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// A state directory operation failed; says on which path.
#[derive(Debug)]
pub struct StateError {
    /// The directory or file.
    pub path: PathBuf,
    /// The underlying error.
    pub source: io::Error,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot use {}: {}: check the state directory's path and permissions",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<StateError> for io::Error {
    fn from(e: StateError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

impl StateDir {
    /// Creates `path` (and missing parents) mode 0700, or tightens an existing directory
    /// to 0700 if group or others had any access to it.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let error = |source| StateError {
            path: path.to_owned(),
            source,
        };
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
        builder.create(path).map_err(error)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(path).map_err(error)?.permissions().mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)).map_err(error)?;
            }
        }
        Ok(StateDir {
            path: path.to_owned(),
        })
    }

    /// Opens the directory that holds `file` (see [`open`](Self::open)) and returns it
    /// with the file's name in it.
    pub fn open_parent_of(file: &Path) -> Result<(StateDir, &std::ffi::OsStr), StateError> {
        let invalid = || StateError {
            path: file.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        };
        let name = file.file_name().ok_or_else(invalid)?;
        let parent = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        Ok((StateDir::open(parent)?, name))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the file `name` in the directory.
    pub fn file(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The contents of the file `name`; `None` if there is no such file.
    pub fn read(&self, name: impl AsRef<Path>) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.file(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError { path, source }),
        }
    }

    /// Replaces the file `name` with `contents` atomically and durably, mode 0600.
    pub fn write(&self, name: impl AsRef<Path>, contents: &[u8]) -> Result<(), StateError> {
        let path = self.file(name);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(path.file_name().unwrap_or_default());
        tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
        let tmp = path.with_file_name(tmp_name);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
        let written = options
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(contents)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StateError { path, source });
        }
        self.sync().map_err(|source| StateError { path, source })
    }

    /// Appends `contents` to the file `name` (created mode 0600 if missing) and makes
    /// them durable. Not atomic: a crash may leave part of `contents` at the end, so a
    /// reader must tell a cut last record from a whole one.
    pub fn append(&self, name: impl AsRef<Path>, contents: &[u8]) -> Result<(), StateError> {
        let path = self.file(name);
        let created = !path.exists();
        let mut options = fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
        let appended = options.open(&path).and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_data()
        });
        let synced = appended.and_then(|()| if created { self.sync() } else { Ok(()) });
        synced.map_err(|source| StateError { path, source })
    }

    /// Makes the directory's entries (a rename) durable.
    fn sync(&self) -> io::Result<()> {
        #[cfg(unix)]
        fs::File::open(&self.path)?.sync_all()?;
        Ok(())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A path under the system temp dir (not created), removed with everything in it on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            Scratch(
                std::env::temp_dir()
                    .join(format!("portferry-state-{:016x}", rand::random::<u64>())),
            )
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700));
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_directory_and_its_parents_are_private() {
        let scratch = Scratch::new();
        let path = scratch.0.join("a/b");
        let dir = StateDir::open(&path).unwrap();
        assert_eq!(dir.path(), path);
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&scratch.0.join("a")), 0o700);
        assert_eq!(mode(&scratch.0), 0o700);
    }

    #[test]
    fn an_existing_looser_directory_is_tightened() {
        let scratch = Scratch::new();
        fs::create_dir(&scratch.0).unwrap();
        for loose in [0o755, 0o777, 0o710, 0o701] {
            fs::set_permissions(&scratch.0, fs::Permissions::from_mode(loose)).unwrap();
            StateDir::open(&scratch.0).unwrap();
            assert_eq!(mode(&scratch.0), 0o700, "from {loose:o}");
        }
        // Stricter than 0700 is left alone.
        fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o500)).unwrap();
        StateDir::open(&scratch.0).unwrap();
        assert_eq!(mode(&scratch.0), 0o500);
    }

    #[test]
    fn files_are_private_replaced_whole_and_leave_no_temporary() {
        let scratch = Scratch::new();
        let dir = StateDir::open(&scratch.0).unwrap();
        assert!(dir.read("leases").unwrap().is_none());
        // A file left world-readable by an older version is replaced by a private one.
        fs::write(dir.file("leases"), "old\n").unwrap();
        fs::set_permissions(dir.file("leases"), fs::Permissions::from_mode(0o644)).unwrap();
        dir.write("leases", b"first\n").unwrap();
        assert_eq!(mode(&dir.file("leases")), 0o600);
        dir.write("leases", b"second\n").unwrap();
        assert_eq!(dir.read("leases").unwrap().unwrap(), b"second\n");
        assert_eq!(mode(&dir.file("leases")), 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["leases"]);
    }

    #[test]
    fn the_parent_of_a_file_is_opened_private() {
        let scratch = Scratch::new();
        let file = scratch.0.join("state/leases");
        let (dir, name) = StateDir::open_parent_of(&file).unwrap();
        dir.write(name, b"x").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"x");
        assert_eq!(mode(&scratch.0.join("state")), 0o700);
        assert!(StateDir::open_parent_of(Path::new("/")).is_err());
    }

    #[test]
    fn failures_name_the_path() {
        let scratch = Scratch::new();
        fs::create_dir(&scratch.0).unwrap();
        let file = scratch.0.join("plain");
        fs::write(&file, "").unwrap();
        let err = StateDir::open(&file.join("below")).unwrap_err();
        assert!(err.to_string().contains("plain"), "{err}");
        let dir = StateDir::open(&scratch.0).unwrap();
        fs::create_dir(dir.file("taken")).unwrap();
        fs::write(dir.file("taken/x"), "").unwrap();
        let err = dir.write("taken", b"y").unwrap_err();
        assert_eq!(err.path, dir.file("taken"));
        assert!(dir.read("taken").is_err());
    }
}
