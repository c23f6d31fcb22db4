/*
 * The page pattern, bit for bit the same as `guest_images::abi::pattern`
 * (src/abi.rs): the VMM checks guest pages from outside with the Rust
 * versions, the guest writes and checks them with these.
 */
#ifndef GUEST_PATTERN_H
#define GUEST_PATTERN_H

#include "abi.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long i64;

#define PAT_MAGIC          (((u64)ABI_PAGE_MAGIC_HI << 32) | (u64)ABI_PAGE_MAGIC_LO)
#define PAT_CHECKSUM_WORD  3
#define PAT_WORDS          512
#define PAT_CSUM_INIT      0x243F6A8885A308D3UL
#define PAT_CSUM_MUL       0x00000100000001B3UL

/* splitmix64's finaliser (abi::pattern::mix). */
static inline u64 pat_mix(u64 z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
	return z ^ (z >> 31);
}

/* Body word i of page gpfn at generation gen (abi::pattern::word). */
static inline u64 pat_word(u64 gpfn, u64 gen, u64 i)
{
	return pat_mix(gpfn * 0x9E3779B97F4A7C15UL + gen * 0xD1B54A32D192ED03UL + i);
}

/* One step of the checksum (FNV-1a style over 64-bit words). */
static inline u64 pat_csum_step(u64 c, u64 w)
{
	return (c ^ w) * PAT_CSUM_MUL;
}

/* Checksum over all 512 words except word 3 (abi::pattern::checksum). */
static inline u64 pat_checksum(const volatile u64 *w)
{
	u64 c = PAT_CSUM_INIT;
	for (u64 j = 0; j < PAT_WORDS; j++)
		if (j != PAT_CHECKSUM_WORD)
			c = pat_csum_step(c, w[j]);
	return pat_mix(c);
}

/* Body words rewritten per generation (abi::pattern::fill_words). */
static inline u64 pat_fill_words(u64 fill_pct)
{
	if (fill_pct < 1)
		fill_pct = 1;
	if (fill_pct > 100)
		fill_pct = 100;
	return ABI_PAGE_BODY_WORDS * fill_pct / 100;
}

/* The page for (gpfn, gen, fill_pct) (abi::pattern::build). */
static inline void pat_build(u64 *w, u64 gpfn, u64 gen, u64 fill_pct)
{
	u64 n = pat_fill_words(fill_pct);
	for (u64 j = 0; j < PAT_WORDS; j++)
		w[j] = 0;
	w[0] = PAT_MAGIC;
	w[1] = gpfn;
	w[2] = gen;
	for (u64 i = 0; i < n; i++)
		w[ABI_PAGE_HDR_WORDS + i] = pat_word(gpfn, gen, i);
	w[PAT_CHECKSUM_WORD] = pat_checksum(w);
}

/* Guest-physical address of working-set page j (abi::wset_page_gpa). */
static inline u64 wset_page_gpa(u64 j)
{
	u64 gpa = ABI_WSET_GPA + j * ABI_PAGE_SIZE;
	return gpa >= ABI_MMIO_GAP_START ? gpa + ABI_MMIO_GAP_SIZE : gpa;
}

#endif
