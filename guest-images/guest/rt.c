/*
 * Freestanding runtime for the ring-3 C code: the mem* functions gcc may
 * emit calls to, port I/O, and a tiny printf on the 16550 at 0x3f8.
 */
#include <stdarg.h>
#include "rt.h"

void *memset(void *dst, int c, unsigned long n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, unsigned long n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

#define COM1     0x3F8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20

void serial_putc(char c)
{
	/* Bounded wait: a VMM without a UART may answer 0 forever. */
	for (int i = 0; i < 10000 && !(inb(COM1_LSR) & LSR_THRE); i++)
		cpu_relax();
	outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
	for (; *s; s++) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s);
	}
}

static void put_num(u64 v, unsigned base, int width, char pad)
{
	char buf[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	for (; width > n; width--)
		serial_putc(pad);
	while (n)
		serial_putc(buf[--n]);
}

/* %u %x %s %c and %%; optional width with '0' or ' ' padding; all numeric
 * arguments are u64. */
void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			if (*fmt == '\n')
				serial_putc('\r');
			serial_putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0;
		if (*fmt == '0')
			pad = '0';
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		switch (*fmt) {
		case 'u':
			put_num(va_arg(ap, u64), 10, width, pad);
			break;
		case 'x':
			put_num(va_arg(ap, u64), 16, width, pad);
			break;
		case 's':
			serial_puts(va_arg(ap, const char *));
			break;
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case '%':
			serial_putc('%');
			break;
		default: /* malformed format: stop */
			va_end(ap);
			return;
		}
	}
	va_end(ap);
}
