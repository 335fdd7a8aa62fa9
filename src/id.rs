//! Random 128-bit identifiers written as 32 lowercase hex digits: the request ids the proxy
//! generates and the user ids its sticky cookie gives anonymous visitors.

use rand::{Rng, RngExt};

/// An id: 128 random bits. Bytes rather than a `u128`, whose 16-byte alignment would pad
/// every struct of the forward path that holds one.
pub type Id = [u8; 16];

/// A new random id from `rng`.
pub fn random(rng: &mut impl Rng) -> Id {
    // One u128 draw: an array would be drawn byte by byte.
    rng.random::<u128>().to_le_bytes()
}

/// `id` as 32 hex digits, each byte low nibble first.
#[inline]
pub fn hex(id: Id) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (i, byte) in id.into_iter().enumerate() {
        text[2 * i] = HEX[usize::from(byte & 0xf)];
        text[2 * i + 1] = HEX[usize::from(byte >> 4)];
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_hex_nibbles_lowest_first() {
        let id = hex(0xfedc_ba98_7654_3210_0123_4567_89ab_cdef_u128.to_le_bytes());
        assert_eq!(&id, b"fedcba98765432100123456789abcdef");
        assert_eq!(&hex([0; 16]), b"00000000000000000000000000000000");
        assert_eq!(&hex([0xff; 16]), b"ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn random_ids_differ() {
        let mut rng = rand::rng();
        assert_ne!(random(&mut rng), random(&mut rng));
    }
}
