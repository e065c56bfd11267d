/*
 * Does PATH look like an OCI-SIF? Checked where the user submits, so a typo fails
 * the submission at once instead of in the Prolog. Reads only the 128-byte global
 * header and the descriptor table: SIF magic, version 01, table inside the file, and
 * at least one used OCI root-index descriptor (data type 0x400A). The Prolog does the
 * full validation on the node.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sifoverlay.h"

#define SIF_HEADER_SIZE 128
#define SIF_MAGIC_OFF 32
#define SIF_VERSION_OFF 42
/* launch(32) magic(10) version(3) arch(3) id(16), then int64: ctime mtime dfree dtotal descroff descrlen ... */
#define SIF_DTOTAL_OFF 88
#define SIF_DESCROFF_OFF 96
#define SIF_DESCRLEN_OFF 104
#define SIF_DESCRIPTOR_SIZE 585
#define SIF_DT_OCI_ROOT_INDEX 0x400A
#define SIF_MAX_DESCRIPTORS 65536   /* refuse absurd tables instead of reading them */

static int64_t le64(const unsigned char *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return (int64_t)le64toh(v);
}

static int32_t le32(const unsigned char *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return (int32_t)le32toh(v);
}

static int read_full(int fd, void *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		done += (size_t)n;
	}
	return 0;
}

static int scan_table(int fd, const char *path, int64_t total, int64_t off, int64_t size,
		      char *err, size_t errlen)
{
	unsigned char desc[SIF_DESCRIPTOR_SIZE];

	for (int64_t i = 0; i < total; i++) {
		if (read_full(fd, desc, sizeof(desc), (off_t)(off + i * SIF_DESCRIPTOR_SIZE)) < 0) {
			snprintf(err, errlen, "%s: descriptor table truncated", path);
			return -1;
		}
		/* datatype int32 at 0, used flag at 4 */
		if (desc[4] && le32(desc) == SIF_DT_OCI_ROOT_INDEX)
			return 0;
	}
	(void)size;
	snprintf(err, errlen, "%s: not an OCI-SIF (a SIF without an OCI root index)", path);
	return -1;
}

int sifo_check_ocisif(const char *path, char *err, size_t errlen)
{
	unsigned char hdr[SIF_HEADER_SIZE];
	struct stat st;
	int64_t total, off, size;
	int fd, rc;

	if (path[0] != '/') {
		snprintf(err, errlen, "%s: not an absolute path", path);
		return -1;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		snprintf(err, errlen, "%s: cannot open for reading: %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "%s: not a regular file", path);
		close(fd);
		return -1;
	}
	if (read_full(fd, hdr, sizeof(hdr), 0) < 0 ||
	    memcmp(hdr + SIF_MAGIC_OFF, "SIF_MAGIC\0", 10) != 0) {
		snprintf(err, errlen, "%s: not a SIF image (no SIF magic)", path);
		close(fd);
		return -1;
	}
	if (memcmp(hdr + SIF_VERSION_OFF, "01\0", 3) != 0) {
		snprintf(err, errlen, "%s: unsupported SIF version", path);
		close(fd);
		return -1;
	}
	total = le64(hdr + SIF_DTOTAL_OFF);
	off = le64(hdr + SIF_DESCROFF_OFF);
	size = le64(hdr + SIF_DESCRLEN_OFF);
	if (total <= 0 || total > SIF_MAX_DESCRIPTORS || off < SIF_HEADER_SIZE ||
	    size < total * SIF_DESCRIPTOR_SIZE || off > st.st_size ||
	    total * SIF_DESCRIPTOR_SIZE > st.st_size - off) {
		snprintf(err, errlen, "%s: SIF descriptor table is outside the file", path);
		close(fd);
		return -1;
	}
	rc = scan_table(fd, path, total, off, size, err, errlen);
	close(fd);
	return rc;
}
