/*
 * Move the calling task (slurmstepd's child, still root, just before it drops to the
 * job's uid) into the rootfs the Prolog assembled: a private mount namespace, the
 * host's /proc /dev /sys /tmp bound onto the image's own directories (/dev without the GPUs
 * not allocated to the job, when the view names some), the job view's
 * binds (identity and network files, $HOME, --oci-sif-mounts, site binds, GPU driver
 * files: the Prolog planned them, runtime/jobview.py), chroot, and the working directory
 * (docs/slurm.md "Working directory").
 *
 * A user-named bind source is opened with the job user's fsuid, fsgid and groups (no
 * capabilities): she binds only what she could reach herself, whatever she renamed
 * since the Prolog checked it. The bind then goes through that fd.
 *
 * The rootfs is served by FUSE daemons that run as the job's user, so every lookup
 * inside it is user-controlled: bind targets are opened component by component with
 * O_NOFOLLOW and mounted through /proc/self/fd, never by a path the image could
 * redirect with a symlink.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <grp.h>
#include <sys/fsuid.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sifoverlay.h"

static const char *const host_binds[] = { "/proc", "/dev", "/sys", "/tmp", NULL };

/* Open a path below rootfd without following any symlink; -1 if absent. The last
 * component may be a file unless want_dir. */
static int open_below_any(int rootfd, const char *rel, bool want_dir)
{
	char buf[PATH_MAX];
	int fd = dup(rootfd);

	if (fd < 0 || strlen(rel) >= sizeof(buf))
		return -1;
	strcpy(buf, rel);
	for (char *save = NULL, *part = strtok_r(buf, "/", &save); part;
	     part = strtok_r(NULL, "/", &save)) {
		int next;
		bool last = !save || !*save || strspn(save, "/") == strlen(save);
		if (!strcmp(part, "..") || !strcmp(part, ".")) {
			close(fd);
			return -1;
		}
		next = openat(fd, part, O_PATH | O_NOFOLLOW | O_CLOEXEC | (last && !want_dir ? 0 : O_DIRECTORY));
		close(fd);
		if (next < 0)
			return -1;
		fd = next;
	}
	return fd;
}

static int open_below(int rootfd, const char *rel)
{
	return open_below_any(rootfd, rel, true);
}

/* O_PATH only needs the path to be traversable: also ask for read access to the
 * directory or regular file itself (with the current fs credentials, i.e. the user's);
 * anything else (device, FIFO, socket) is not bindable by a user. */
static bool readable_as_current_fsuid(int fd)
{
	char self[64];
	struct stat st;
	int probe;

	if (fstat(fd, &st) < 0)
		return false;
	if (S_ISDIR(st.st_mode)) {
		probe = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	} else if (S_ISREG(st.st_mode)) {
		snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
		probe = open(self, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	} else {
		errno = EPERM;
		return false;
	}
	if (probe < 0)
		return false;
	close(probe);
	return true;
}

/* O_PATH fd of a user-named source, opened with the job user's file credentials. */
static int open_as_user(const char *path, const struct sifo_cred *cred)
{
	gid_t saved[NGROUPS_MAX];
	int nsaved = getgroups(NGROUPS_MAX, saved), fd, saved_errno;

	if (nsaved < 0 || setgroups((size_t)cred->ngids, cred->gids) < 0)
		return -1;
	setfsgid(cred->gid);
	setfsuid(cred->uid); /* drops CAP_DAC_OVERRIDE & co. until set back to 0 */
	if ((uid_t)setfsuid(cred->uid) != cred->uid) {
		fd = -1;
		errno = EPERM;
	} else {
		fd = open(path, O_PATH | O_CLOEXEC);
		if (fd >= 0 && !readable_as_current_fsuid(fd)) {
			saved_errno = errno;
			close(fd);
			fd = -1;
			errno = saved_errno;
		}
	}
	saved_errno = errno;
	setfsuid(0);
	setfsgid(0);
	if (setgroups((size_t)nsaved, saved) < 0 && fd >= 0) {
		close(fd);
		fd = -1;
	}
	errno = saved_errno;
	return fd;
}

static int bind_view(int rootfd, const struct sifo_bind *b, const struct sifo_cred *cred, char *err,
		     size_t errlen)
{
	char source[64], target[64];
	struct stat st;
	int src, dst;
	unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV;

	src = b->system || !cred ? open(b->source, O_PATH | O_CLOEXEC) : open_as_user(b->source, cred);
	if (src < 0) {
		snprintf(err, errlen, "bind source %s: %s%s", b->source, strerror(errno),
			 b->system ? "" : " (as the job user)");
		return -1;
	}
	if (fstat(src, &st) < 0) {
		close(src);
		snprintf(err, errlen, "bind source %s: %s", b->source, strerror(errno));
		return -1;
	}
	dst = open_below_any(rootfd, b->dest + 1, S_ISDIR(st.st_mode));
	if (dst < 0) {
		close(src);
		snprintf(err, errlen, "bind destination %s: missing in the image, or a symlink", b->dest);
		return -1;
	}
	snprintf(source, sizeof(source), "/proc/self/fd/%d", src);
	snprintf(target, sizeof(target), "/proc/self/fd/%d", dst);
	if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) < 0) {
		snprintf(err, errlen, "cannot bind %s on %s: %s", b->source, b->dest, strerror(errno));
		close(src);
		close(dst);
		return -1;
	}
	close(src);
	close(dst);
	/* the remount must name the new mount: resolve the destination again */
	dst = open_below_any(rootfd, b->dest + 1, S_ISDIR(st.st_mode));
	snprintf(target, sizeof(target), "/proc/self/fd/%d", dst);
	if (b->readonly)
		flags |= MS_RDONLY;
	if (dst < 0 || mount(NULL, target, NULL, flags, NULL) < 0) {
		snprintf(err, errlen, "cannot make the bind on %s nosuid,nodev%s: %s", b->dest,
			 b->readonly ? ",ro" : "", strerror(errno));
		if (dst >= 0)
			close(dst);
		return -1;
	}
	close(dst);
	return 0;
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

static bool dev_hidden(const struct sifo_view *view, const char *name)
{
	for (int i = 0; i < view->n_dev_hidden; i++)
		if (!strcmp(view->dev_hidden[i], name))
			return true;
	return false;
}

/* One entry of the host's /dev into the job's /dev tmpfs: a symlink copied, anything else
 * bound on an empty file or directory (it keeps its own mount's flags: devices work). */
static int dev_entry(int devfd, const char *name, char *err, size_t errlen)
{
	char source[PATH_MAX], target[64], link[PATH_MAX];
	struct stat st;
	ssize_t n;
	int fd;

	snprintf(source, sizeof(source), "/dev/%s", name);
	if (lstat(source, &st) < 0)
		return 0; /* gone meanwhile */
	if (S_ISLNK(st.st_mode)) {
		n = readlink(source, link, sizeof(link) - 1);
		if (n < 0)
			return 0;
		link[n] = '\0';
		return symlinkat(link, devfd, name) < 0 && errno != EEXIST ? -1 : 0;
	}
	if (S_ISDIR(st.st_mode)) {
		if (mkdirat(devfd, name, 0755) < 0 && errno != EEXIST)
			return -1;
	} else {
		fd = openat(devfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0 && errno != EEXIST)
			return -1;
		if (fd >= 0)
			close(fd);
	}
	fd = openat(devfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -1;
	snprintf(target, sizeof(target), "/proc/self/fd/%d", fd);
	if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) < 0 && errno != ENOENT) {
		snprintf(err, errlen, "cannot bind %s into the image: %s", source, strerror(errno));
		close(fd);
		return -2;
	}
	close(fd);
	return 0;
}

/* The image's /dev as a tmpfs holding the host's /dev entries but the view's hidden ones
 * (the GPUs not allocated to the job: runtime/gpu.py, slurm/taskview.py), then read-only.
 * Nothing of it reaches the overlay. */
static int filtered_dev(int rootfd, const struct sifo_view *view, char *err, size_t errlen)
{
	char target[64];
	int fd = open_below(rootfd, "dev"), devfd, rc = 0;
	struct dirent *e;
	DIR *host;

	if (fd < 0) {
		sifo_debug("image has no directory /dev: not binding it");
		return 0;
	}
	snprintf(target, sizeof(target), "/proc/self/fd/%d", fd);
	if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=64k") < 0) {
		snprintf(err, errlen, "cannot mount a tmpfs on the image's /dev: %s", strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	devfd = open_below(rootfd, "dev"); /* the tmpfs now */
	host = devfd >= 0 ? opendir("/dev") : NULL;
	if (!host) {
		snprintf(err, errlen, "cannot list /dev for the job: %s", strerror(errno));
		if (devfd >= 0)
			close(devfd);
		return -1;
	}
	while (rc == 0 && (e = readdir(host))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || dev_hidden(view, e->d_name))
			continue;
		rc = dev_entry(devfd, e->d_name, err, errlen);
		if (rc == -1)
			snprintf(err, errlen, "cannot make /dev/%s in the job's /dev: %s", e->d_name, strerror(errno));
	}
	closedir(host);
	snprintf(target, sizeof(target), "/proc/self/fd/%d", devfd);
	if (rc == 0 && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
			     NULL) < 0) {
		snprintf(err, errlen, "cannot make the job's /dev read-only: %s", strerror(errno));
		rc = -1;
	}
	close(devfd);
	return rc < 0 ? -1 : 0;
}

int sifo_enter_rootfs(const char *rootfs, const struct sifo_view *view, const struct sifo_cred *cred,
		      const char *const *cwds, int ncwds, bool cwd_required, char *err, size_t errlen)
{
	int rootfd, newroot;

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
		bool filter = !strcmp(*dir, "/dev") && view && view->n_dev_hidden > 0;
		if ((filter ? filtered_dev(rootfd, view, err, errlen) : bind_into(rootfd, *dir, err, errlen)) < 0) {
			close(rootfd);
			return -1;
		}
	}
	for (int i = 0; view && i < view->n_binds; i++) {
		if (bind_view(rootfd, &view->binds[i], cred, err, errlen) < 0) {
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
	for (int i = 0; newroot >= 0 && i < ncwds; i++) {
		int cwdfd = cwds[i] && cwds[i][0] == '/' ? open_below(newroot, cwds[i] + 1) : -1;
		if (cwdfd >= 0 && fchdir(cwdfd) == 0) {
			close(cwdfd);
			close(newroot);
			if (i > 0)
				dprintf(2, "sifoverlay: warning: %s does not exist in the image: working "
					"directory is %s\n", cwds[0], cwds[i]);
			return 0;
		}
		if (cwdfd >= 0)
			close(cwdfd);
		if (i == 0 && cwd_required) {
			close(newroot);
			snprintf(err, errlen, "working directory %s: No such file or directory in the image",
				 cwds[0]);
			return -1;
		}
	}
	if (newroot >= 0)
		close(newroot);
	if (chdir("/") < 0) {
		snprintf(err, errlen, "chdir / in the image: %s", strerror(errno));
		return -1;
	}
	if (ncwds > 0 && strcmp(cwds[0], "/"))
		dprintf(2, "sifoverlay: warning: %s does not exist in the image: working directory is /\n",
			cwds[0]);
	return 0;
}
