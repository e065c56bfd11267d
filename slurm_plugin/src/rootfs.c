/*
 * Move the calling task (slurmstepd's child, still root, just before it drops to the
 * job's uid) into the rootfs the Prolog assembled: a private mount namespace, the
 * host's /proc /dev /sys /tmp bound onto the image's own directories, chroot, and the
 * submit cwd when the image has it (else /).
 *
 * The rootfs is served by FUSE daemons that run as the job's user, so every lookup
 * inside it is user-controlled: bind targets are opened component by component with
 * O_NOFOLLOW and mounted through /proc/self/fd, never by a path the image could
 * redirect with a symlink.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sifoverlay.h"

static const char *const host_binds[] = { "/proc", "/dev", "/sys", "/tmp", NULL };

/* Open a directory below rootfd without following any symlink; -1 if absent. */
static int open_below(int rootfd, const char *rel)
{
	char buf[PATH_MAX];
	int fd = dup(rootfd);

	if (fd < 0 || strlen(rel) >= sizeof(buf))
		return -1;
	strcpy(buf, rel);
	for (char *save = NULL, *part = strtok_r(buf, "/", &save); part;
	     part = strtok_r(NULL, "/", &save)) {
		int next;
		if (!strcmp(part, "..") || !strcmp(part, ".")) {
			close(fd);
			return -1;
		}
		next = openat(fd, part, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		close(fd);
		if (next < 0)
			return -1;
		fd = next;
	}
	return fd;
}

static int bind_into(int rootfd, const char *host_dir, char *err, size_t errlen)
{
	char target[64];
	int fd = open_below(rootfd, host_dir + 1);

	if (fd < 0) {
		sifo_debug("image has no directory %s: not binding it", host_dir);
		return 0;
	}
	snprintf(target, sizeof(target), "/proc/self/fd/%d", fd);
	if (mount(host_dir, target, NULL, MS_BIND | MS_REC, NULL) < 0) {
		snprintf(err, errlen, "cannot bind %s into the image: %s", host_dir, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

int sifo_enter_rootfs(const char *rootfs, const char *cwd, char *err, size_t errlen)
{
	int rootfd, cwdfd = -1, newroot;

	if (unshare(CLONE_NEWNS) < 0) {
		snprintf(err, errlen, "unshare(CLONE_NEWNS): %s", strerror(errno));
		return -1;
	}
	/* Nothing this task mounts may leak back to the node. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		snprintf(err, errlen, "making / private: %s", strerror(errno));
		return -1;
	}
	rootfd = open(rootfs, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (rootfd < 0) {
		snprintf(err, errlen, "cannot open rootfs %s: %s", rootfs, strerror(errno));
		return -1;
	}
	for (const char *const *dir = host_binds; *dir; dir++) {
		if (bind_into(rootfd, *dir, err, errlen) < 0) {
			close(rootfd);
			return -1;
		}
	}
	if (fchdir(rootfd) < 0 || chroot(".") < 0) {
		snprintf(err, errlen, "cannot chroot into %s: %s", rootfs, strerror(errno));
		close(rootfd);
		return -1;
	}
	close(rootfd);
	newroot = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (newroot >= 0 && cwd && cwd[0] == '/')
		cwdfd = open_below(newroot, cwd + 1);
	if (newroot >= 0)
		close(newroot);
	if (cwdfd >= 0 && fchdir(cwdfd) == 0) {
		close(cwdfd);
		return 0;
	}
	if (cwdfd >= 0)
		close(cwdfd);
	if (chdir("/") < 0) {
		snprintf(err, errlen, "chdir / in the image: %s", strerror(errno));
		return -1;
	}
	return 0;
}
