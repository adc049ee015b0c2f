//! What `portferry` asks of the operating system for itself: that freed socket buffers
//! go back to it, and as many open files as it allows.

/// Allocations of 64 KiB and more (every connection's socket buffers) get mappings of
/// their own, given back to the OS when freed. glibc's default raises that threshold
/// as soon as such a buffer is freed and then keeps them in its heap: after a burst of
/// 400 downloads the relay stayed at 37 MiB instead of 14 (`HOSTILE_ONLY=memory cargo
/// bench --bench hostile`; jemalloc and mimalloc measured there too, see issue 12).
pub fn return_big_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator, under its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Raises the soft limit on open files to the hard one, as far as the system lets it;
/// the soft limit then in force (`u64::MAX`: none known).
pub fn raise_open_files_limit() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return u64::MAX;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        limit.rlim_cur
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    u64::MAX
}
