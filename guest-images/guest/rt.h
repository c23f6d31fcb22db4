/* Freestanding helpers for the ring-3 C code (rt.c). */
#ifndef GUEST_RT_H
#define GUEST_RT_H

#include "pattern.h" /* integer types */

/*
 * Port I/O, always with the port in DX (so the instruction is one of the
 * one-byte forms EC/ED/EE/EF). Ring 3 runs with IOPL=3, which makes these
 * legal natively (QEMU, plain KVM); on the nested-PVM host, which forces
 * IOPL=0 in ring 3, each of them traps to the #GP handler in boot.S, which
 * performs it at CPL 0 and resumes after it. Same code either way.
 */
static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %w1" : : "a"(v), "d"(port) : "memory");
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %w1, %0" : "=a"(v) : "d"(port) : "memory");
	return v;
}

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %w1" : : "a"(v), "d"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %w1, %0" : "=a"(v) : "d"(port) : "memory");
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);
void *memmove(void *dst, const void *src, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);

void serial_putc(char c);
void serial_puts(const char *s);
void kprintf(const char *fmt, ...);

#endif
