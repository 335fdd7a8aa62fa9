//! Random 128-bit identifiers written as 32 lowercase hex digits: the request ids the proxy
//! generates and the user ids its sticky cookie gives anonymous visitors.

use rand::{Rng, RngExt};

/// A new random id, 128 bits from `rng`.
pub fn random(rng: &mut impl Rng) -> u128 {
    rng.random()
}

/// `bits` as 32 hex digits, lowest nibble first.
pub fn hex(bits: u128) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (pair, byte) in text.chunks_exact_mut(2).zip(bits.to_le_bytes()) {
        pair[0] = HEX[usize::from(byte & 0xf)];
        pair[1] = HEX[usize::from(byte >> 4)];
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_hex_nibbles_lowest_first() {
        let id = hex(0xfedc_ba98_7654_3210_0123_4567_89ab_cdef);
        assert_eq!(&id, b"fedcba98765432100123456789abcdef");
        assert_eq!(&hex(0), b"00000000000000000000000000000000");
        assert_eq!(&hex(u128::MAX), b"ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn random_ids_differ() {
        let mut rng = rand::rng();
        assert_ne!(random(&mut rng), random(&mut rng));
    }
}
