//! Member offsets of kernel structures, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The verdict program reads a few kernel fields that no helper exposes (see
//! [`crate::kernel`]); their offsets change between kernel builds, so the daemon looks them up
//! here at start-up and hands them to the program. Only what that takes is parsed: the type
//! section's records (to find a struct by name and walk its members, through anonymous
//! struct and union members) and the string section.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One struct or union member.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing type.
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Type {
    /// A struct or union.
    Composite(Vec<Member>),
    /// typedef, const, volatile, restrict, type tag: refers to another type.
    Alias(u32),
    Other,
}

/// The types and strings of one BTF blob.
#[derive(Debug)]
pub struct Btf<'a> {
    strings: &'a [u8],
    /// By type id (index 0 is the void type).
    types: Vec<Type>,
    /// Named structs, by name offset: their type ids.
    structs: HashMap<&'a [u8], u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses a BTF blob (native little-endian, as the kernel exposes it). None if it is not
    /// one or is cut short.
    pub fn parse(blob: &'a [u8]) -> Option<Self> {
        if u16_at(blob, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(blob, 4)? as usize;
        let (type_off, type_len) = (u32_at(blob, 8)? as usize, u32_at(blob, 12)? as usize);
        let (str_off, str_len) = (u32_at(blob, 16)? as usize, u32_at(blob, 20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            blob.get(start..start.checked_add(len)?)
        };
        let types_sec = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut types = vec![Type::Other];
        let mut structs = HashMap::new();
        let mut at = 0;
        while at < types_sec.len() {
            let name_off = u32_at(types_sec, at)?;
            let info = u32_at(types_sec, at + 4)?;
            let size_or_type = u32_at(types_sec, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let offset = u32_at(types_sec, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(types_sec, m)?,
                            type_id: u32_at(types_sec, m + 4)?,
                            // With kind_flag, the top 8 bits are a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    at += 12 * vlen;
                    if kind == KIND_STRUCT && name_off != 0 {
                        structs
                            .entry(cstr(strings, name_off)?)
                            .or_insert(types.len() as u32);
                    }
                    Type::Composite(members)
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                _ => {
                    at += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                        KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                        // PTR, FWD, FUNC, FLOAT: nothing follows.
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        Some(Self {
            strings,
            types,
            structs,
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous struct and union
    /// members. None if there is no such struct or member, or it is a bitfield.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let id = *self.structs.get(name.as_bytes())?;
        let bits = self.find(id, member.as_bytes(), 0)?;
        bits.is_multiple_of(8).then_some(bits / 8)
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // A chain of modifiers is short; the bound only guards against a malformed loop.
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(next) => id = *next,
                t => return Some(t),
            }
        }
        None
    }

    fn find(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let Some(Type::Composite(members)) = self.resolve(id) else {
            return None;
        };
        for m in members {
            if m.name_off == 0 {
                if let Some(bits) = self.find(m.type_id, member, depth + 1) {
                    return Some(m.bit_offset + bits);
                }
            } else if cstr(self.strings, m.name_off)? == member {
                return Some(m.bit_offset);
            }
        }
        None
    }
}

fn cstr(strings: &[u8], off: u32) -> Option<&[u8]> {
    let s = strings.get(off as usize..)?;
    Some(&s[..s.iter().position(|&b| b == 0)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob: `struct outer { int a; union { int b; struct inner *c; }; int d; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0inner\0";
        let s = |name: &str| {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .expect("name in the strings") as u32;
            pos + 1
        };
        let mut t = Vec::new();
        let mut rec = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (4 bytes)
        rec(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner (forward-declared: FWD)
        rec(&[s("inner"), 7 << 24, 0]);
        // 3: pointer to 2
        rec(&[0, 2 << 24, 2]);
        // 4: anonymous union { int b; struct inner *c; }
        rec(&[0, KIND_UNION << 24 | 2, 8, s("b"), 1, 0, s("c"), 3, 0]);
        // 5: const of 4
        rec(&[0, KIND_CONST << 24, 4]);
        // 6: struct outer { int a @0; <anon> @64; int d @128 }
        rec(&[
            s("outer"),
            KIND_STRUCT << 24 | 3,
            20,
            s("a"),
            1,
            0,
            0,
            5,
            64,
            s("d"),
            1,
            128,
        ]);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let b = blob();
        let btf = Btf::parse(&b).expect("parses");
        assert_eq!(btf.member_offset("outer", "a"), Some(0));
        assert_eq!(btf.member_offset("outer", "c"), Some(8));
        assert_eq!(btf.member_offset("outer", "d"), Some(16));
        assert_eq!(btf.member_offset("outer", "e"), None);
        assert_eq!(btf.member_offset("inner", "a"), None);
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(b"").is_none());
        assert!(Btf::parse(&[0u8; 64]).is_none());
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_none());
    }

    #[test]
    fn reads_this_kernel() {
        let Ok(b) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            return;
        };
        let btf = Btf::parse(&b).expect("the kernel's BTF parses");
        let sk = btf.member_offset("sk_buff", "sk").expect("sk_buff.sk");
        let seq = btf
            .member_offset("tcp_sock", "copied_seq")
            .expect("tcp_sock.copied_seq");
        assert!(sk < 256 && sk.is_multiple_of(8), "sk_buff.sk at {sk}");
        assert!(seq > 0 && seq < 8192, "tcp_sock.copied_seq at {seq}");
    }
}
