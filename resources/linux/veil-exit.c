/*
 * veil-exit N: end the VM with status N (0-255) by writing the byte N to
 * veil's debug-exit port 0xF4 through /dev/port (CONFIG_DEVPORT).
 *
 * Freestanding: no libc, so the static binary is a few hundred bytes and
 * costs nothing measurable to unpack from the initramfs (every byte of it is
 * copied at emulated CPL0 on veil's development KVM).  build.sh compiles it
 * with gcc -static -nostdlib.
 *
 * Exit statuses of its own: 2 for a bad argument, 1 when /dev/port cannot
 * be opened or written, and 1 when the write returned (the VMM did not end
 * the VM, so the port is not veil's debug exit).  Guests use 0-63 for N;
 * veil keeps its own statuses above that (README.md, "Exit status").
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_pwrite64 18
#define SYS_exit 60
#define O_WRONLY 1
#define DEBUG_EXIT_PORT 0xf4

static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long sys4(long nr, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

/* A string literal to stderr (its length known at compile time: no strlen,
 * which gcc would otherwise call for a counting loop). */
#define say(lit) sys3(SYS_write, 2, (long)(lit), sizeof(lit) - 1)

static __attribute__((noreturn)) void quit(int status)
{
	for (;;)
		sys3(SYS_exit, status, 0, 0);
}

/* Decimal 0-255, nothing else. */
static int parse(const char *s)
{
	int v = 0;
	if (!s || !*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (*s - '0');
		if (v > 255)
			return -1;
	}
	return v;
}

__attribute__((noreturn, used)) void veil_exit_main(long argc, char **argv)
{
	int status = argc == 2 ? parse(argv[1]) : -1;
	unsigned char byte;
	long fd;

	if (status < 0) {
		say("usage: veil-exit N (0-255): end the VM with status N\n");
		quit(2);
	}
	fd = sys3(SYS_open, (long)"/dev/port", O_WRONLY, 0);
	if (fd < 0) {
		say("veil-exit: cannot open /dev/port (CONFIG_DEVPORT)\n");
		quit(1);
	}
	byte = (unsigned char)status;
	if (sys4(SYS_pwrite64, fd, (long)&byte, 1, DEBUG_EXIT_PORT) != 1) {
		say("veil-exit: cannot write port 0xf4 through /dev/port\n");
		quit(1);
	}
	say("veil-exit: the VM did not stop: no debug-exit device at port 0xf4\n");
	quit(1);
}

/* The kernel enters with argc at (%rsp) and argv right above it. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov (%rsp), %rdi\n"
	"	lea 8(%rsp), %rsi\n"
	"	and $-16, %rsp\n"
	"	call veil_exit_main\n"
	"	hlt\n");
