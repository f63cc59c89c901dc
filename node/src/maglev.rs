//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for connections from
//! outside: each backend walks the table in its own order, taken from a hash of the
//! backend itself, and the backends take turns claiming the next free entry of their
//! walk until the table is full. Every node builds the same table from the same
//! backends, and a backend that comes or goes changes only about its share of it.

use velox_common::{FlowEnd, MaglevTable, MAGLEV_TABLE_SIZE};

/// The table over `backends`, the slots `0..backends.len()` of a frontend; None for
/// more backends than a slot number holds.
pub fn table(backends: &[FlowEnd]) -> Option<MaglevTable> {
    let size = MAGLEV_TABLE_SIZE;
    let count = u16::try_from(backends.len()).ok()?;
    let mut table = MaglevTable {
        backends: u32::from(count),
        slots: [0; MAGLEV_TABLE_SIZE],
        pad: 0,
    };
    if count == 0 {
        return Some(table);
    }
    // The turns go in the backends' own order, not their slots' (each node puts its
    // own backends first): every node fills the same table.
    let mut order: Vec<u16> = (0..count).collect();
    order.sort_by_key(|&slot| backends[usize::from(slot)]);
    let walks: Vec<(usize, usize)> = order.iter().map(|&slot| walk(&backends[usize::from(slot)])).collect();
    let mut taken = vec![false; size];
    let mut steps = vec![0usize; order.len()];
    let mut filled = 0;
    loop {
        for (turn, &slot) in order.iter().enumerate() {
            let (offset, skip) = walks[turn];
            let mut entry = (offset + steps[turn] * skip) % size;
            while taken[entry] {
                steps[turn] += 1;
                entry = (offset + steps[turn] * skip) % size;
            }
            taken[entry] = true;
            table.slots[entry] = slot;
            steps[turn] += 1;
            filled += 1;
            if filled == size {
                return Some(table);
            }
        }
    }
}

/// Where `backend`'s walk starts and how far each step goes (never 0: the table
/// size is prime, so the walk visits every entry).
fn walk(backend: &FlowEnd) -> (usize, usize) {
    use sha2::{Digest, Sha256};
    let mut bytes = backend.addr.addr.to_vec();
    bytes.extend(backend.port.to_be_bytes());
    bytes.push(backend.proto);
    let digest = Sha256::digest(&bytes);
    let word = |at: usize| u64::from_le_bytes(digest[at..at + 8].try_into().expect("8 bytes")) as usize;
    let size = MAGLEV_TABLE_SIZE;
    (word(0) % size, word(8) % (size - 1) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use velox_common::{IpKey, IPPROTO_TCP};

    fn backend(last: u8) -> FlowEnd {
        FlowEnd {
            addr: IpKey::from(IpAddr::V4(Ipv4Addr::new(10, 244, 0, last))),
            port: 8080u16.to_be(),
            proto: IPPROTO_TCP,
            pad: 0,
        }
    }

    /// The backend each entry of the table names.
    fn owners(backends: &[FlowEnd]) -> Vec<FlowEnd> {
        let table = table(backends).unwrap();
        table.slots.iter().map(|&slot| backends[usize::from(slot)]).collect()
    }

    #[test]
    fn every_backend_gets_its_share_and_the_slot_order_does_not_matter() {
        let backends: Vec<FlowEnd> = (1..=5).map(backend).collect();
        let owners = owners(&backends);
        for b in &backends {
            let share = owners.iter().filter(|o| *o == b).count();
            // 1021 / 5 = 204.2: Maglev fills round-robin, so within one entry.
            assert!((204..=205).contains(&share), "{b:?}: {share}");
        }
        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(self::owners(&reversed), owners, "another node's slot order");
    }

    #[test]
    fn a_backend_leaving_moves_little_more_than_its_own_share() {
        let before: Vec<FlowEnd> = (1..=10).map(backend).collect();
        let after: Vec<FlowEnd> = before.iter().copied().filter(|b| *b != backend(4)).collect();
        let (old, new) = (owners(&before), owners(&after));
        let moved = old
            .iter()
            .zip(&new)
            .filter(|(o, n)| **o != backend(4) && o != n)
            .count();
        // Its own share (about a tenth) must move; Maglev moves a few percent more
        // (34 of 1021 entries here), where a new random pick would move nine tenths.
        assert!(
            moved * 100 < MAGLEV_TABLE_SIZE * 6,
            "{moved} entries of the others moved"
        );
    }

    #[test]
    fn no_backend_is_an_empty_table() {
        assert_eq!(table(&[]).unwrap().backends, 0);
    }
}
