//! Known-answer and property tests for the A256CBC-HS512 envelope and the keyring:
//! RFC 7518 Appendix B.3, Wycheproof (A256CBC-HS512 and AES-256-CBC-PKCS5),
//! NIST SP 800-38A F.2.5/F.2.6, and proptest invariants of `Keyring`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use recvault_runtime::secret::SecretBytes;
use recvault_vault::crypto::{self, A256CbcHs512Key, hazmat};
use recvault_vault::keyring::Keyring;
use serde_json::Value;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.split_whitespace().collect::<String>()).unwrap()
}

fn wycheproof(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/wycheproof")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn field(test: &Value, name: &str) -> Vec<u8> {
    unhex(test[name].as_str().unwrap())
}

// ---------------------------------------------------------------------------
// RFC 7518 Appendix B.3: Test Cases for AES_256_CBC_HMAC_SHA_512

#[test]
fn rfc7518_appendix_b3() {
    let k = unhex(
        "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f
         10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f
         20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f
         30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d 3e 3f",
    );
    let p = unhex(
        "41 20 63 69 70 68 65 72 20 73 79 73 74 65 6d 20
         6d 75 73 74 20 6e 6f 74 20 62 65 20 72 65 71 75
         69 72 65 64 20 74 6f 20 62 65 20 73 65 63 72 65
         74 2c 20 61 6e 64 20 69 74 20 6d 75 73 74 20 62
         65 20 61 62 6c 65 20 74 6f 20 66 61 6c 6c 20 69
         6e 74 6f 20 74 68 65 20 68 61 6e 64 73 20 6f 66
         20 74 68 65 20 65 6e 65 6d 79 20 77 69 74 68 6f
         75 74 20 69 6e 63 6f 6e 76 65 6e 69 65 6e 63 65",
    );
    let iv: [u8; 16] = unhex("1a f3 8c 2d c2 b9 6f fd d8 66 94 09 23 41 bc 04")
        .try_into()
        .unwrap();
    let a = unhex(
        "54 68 65 20 73 65 63 6f 6e 64 20 70 72 69 6e 63
         69 70 6c 65 20 6f 66 20 41 75 67 75 73 74 65 20
         4b 65 72 63 6b 68 6f 66 66 73",
    );
    let e = unhex(
        "4a ff aa ad b7 8c 31 c5 da 4b 1b 59 0d 10 ff bd
         3d d8 d5 d3 02 42 35 26 91 2d a0 37 ec bc c7 bd
         82 2c 30 1d d6 7c 37 3b cc b5 84 ad 3e 92 79 c2
         e6 d1 2a 13 74 b7 7f 07 75 53 df 82 94 10 44 6b
         36 eb d9 70 66 29 6a e6 42 7e a7 5c 2e 08 46 a1
         1a 09 cc f5 37 0d c8 0b fe cb ad 28 c7 3f 09 b3
         a3 b7 5e 66 2a 25 94 41 0a e4 96 b2 e2 e6 60 9e
         31 e6 e0 2c c8 37 f0 53 d2 1f 37 ff 4f 51 95 0b
         be 26 38 d0 9d d7 a4 93 09 30 80 6d 07 03 b1 f6",
    );
    let t = unhex(
        "4d d3 b4 c0 88 a7 f4 5c 21 68 39 64 5b 20 12 bf
         2e 62 69 a8 c5 6a 81 6d bc 1b 26 77 61 95 5b c5",
    );
    assert_eq!(p, b"A cipher system must not be required to be secret, and it must be able to fall into the hands of the enemy without inconvenience");
    assert_eq!(a, b"The second principle of Auguste Kerckhoffs");

    let key = A256CbcHs512Key::from_slice(&k).unwrap();
    let (ciphertext, tag) = crypto::encrypt_with_iv(&key, &iv, &a, &p);
    assert_eq!(ciphertext, e);
    assert_eq!(tag.as_slice(), t.as_slice());
    let plaintext = crypto::decrypt(&key, &iv, &a, &e, &t).unwrap();
    assert_eq!(plaintext.expose_secret(), p.as_slice());

    // The CBC layer alone, with ENC_KEY = last 32 bytes of K (RFC 7518 §5.2.2.1).
    let enc_key: [u8; 32] = k[32..].try_into().unwrap();
    assert_eq!(hazmat::cbc_encrypt_pkcs7(&enc_key, &iv, &p), e);
}

// ---------------------------------------------------------------------------
// Wycheproof a256cbc_hs512_test.json: all 94 vectors, valid and invalid

#[test]
fn wycheproof_a256cbc_hs512() {
    let doc = wycheproof("a256cbc_hs512_test.json");
    assert_eq!(doc["algorithm"], "A256CBC-HS512");
    let (mut valid, mut invalid) = (0, 0);
    for group in doc["testGroups"].as_array().unwrap() {
        for test in group["tests"].as_array().unwrap() {
            let id = &test["tcId"];
            let key = A256CbcHs512Key::from_slice(&field(test, "key")).unwrap();
            let iv = field(test, "iv");
            let (aad, msg, ct, tag) = (
                field(test, "aad"),
                field(test, "msg"),
                field(test, "ct"),
                field(test, "tag"),
            );
            match test["result"].as_str().unwrap() {
                "valid" => {
                    let iv: [u8; 16] = iv.as_slice().try_into().unwrap();
                    let (got_ct, got_tag) = crypto::encrypt_with_iv(&key, &iv, &aad, &msg);
                    assert_eq!(got_ct, ct, "tcId {id}: ciphertext");
                    assert_eq!(got_tag.as_slice(), tag.as_slice(), "tcId {id}: tag");
                    let pt = crypto::decrypt(&key, &iv, &aad, &ct, &tag)
                        .unwrap_or_else(|e| panic!("tcId {id}: {e}"));
                    assert_eq!(pt.expose_secret(), msg.as_slice(), "tcId {id}: plaintext");
                    valid += 1;
                }
                "invalid" => {
                    assert!(
                        crypto::decrypt(&key, &iv, &aad, &ct, &tag).is_err(),
                        "tcId {id} must be rejected"
                    );
                    invalid += 1;
                }
                other => panic!("tcId {id}: unexpected result {other}"),
            }
        }
    }
    assert_eq!(valid + invalid, 94);
    assert_eq!(doc["numberOfTests"], 94);
    assert_eq!((valid, invalid), (67, 27));
}

// ---------------------------------------------------------------------------
// Wycheproof aes_cbc_pkcs5_test.json, AES-256 groups (the CBC layer the AEAD uses)

#[test]
fn wycheproof_aes256_cbc_pkcs5() {
    let doc = wycheproof("aes_cbc_pkcs5_test.json");
    let mut count = 0;
    for group in doc["testGroups"].as_array().unwrap() {
        if group["keySize"] != 256 {
            continue;
        }
        for test in group["tests"].as_array().unwrap() {
            let id = &test["tcId"];
            let key: [u8; 32] = field(test, "key").try_into().unwrap();
            let iv: [u8; 16] = field(test, "iv").try_into().unwrap();
            let (msg, ct) = (field(test, "msg"), field(test, "ct"));
            match test["result"].as_str().unwrap() {
                "valid" => {
                    assert_eq!(hazmat::cbc_encrypt_pkcs7(&key, &iv, &msg), ct, "tcId {id}");
                    let pt = hazmat::cbc_decrypt_pkcs7(&key, &iv, &ct).unwrap();
                    assert_eq!(pt.expose_secret(), msg.as_slice(), "tcId {id}");
                }
                "invalid" => assert!(
                    hazmat::cbc_decrypt_pkcs7(&key, &iv, &ct).is_err(),
                    "tcId {id} must be rejected"
                ),
                other => panic!("tcId {id}: unexpected result {other}"),
            }
            count += 1;
        }
    }
    assert_eq!(count, 72);
}

// ---------------------------------------------------------------------------
// NIST SP 800-38A Appendix F.2.5 / F.2.6: CBC-AES256

const SP800_38A_KEY: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
const SP800_38A_IV: &str = "000102030405060708090a0b0c0d0e0f";
const SP800_38A_PLAINTEXT: &str = "6bc1bee22e409f96e93d7e117393172a
    ae2d8a571e03ac9c9eb76fac45af8e51
    30c81c46a35ce411e5fbc1191a0a52ef
    f69f2445df4f9b17ad2b417be66c3710";
const SP800_38A_CBC_AES256_CIPHERTEXT: &str = "f58c4c04d6e5f1ba779eabfb5f7bfbd6
    9cfc4e967edb808d679f777bc6702c7d
    39f23369a9d9bacfa530e26304231461
    b2eb05e2c39be9fcda6c19078c6a9d1b";

fn sp800_38a_key_iv() -> ([u8; 32], [u8; 16]) {
    (
        unhex(SP800_38A_KEY).try_into().unwrap(),
        unhex(SP800_38A_IV).try_into().unwrap(),
    )
}

#[test]
fn nist_sp800_38a_f2_5_cbc_aes256_encrypt() {
    let (key, iv) = sp800_38a_key_iv();
    let ct = hazmat::cbc_encrypt_no_padding(&key, &iv, &unhex(SP800_38A_PLAINTEXT)).unwrap();
    assert_eq!(ct, unhex(SP800_38A_CBC_AES256_CIPHERTEXT));
}

#[test]
fn nist_sp800_38a_f2_6_cbc_aes256_decrypt() {
    let (key, iv) = sp800_38a_key_iv();
    let pt =
        hazmat::cbc_decrypt_no_padding(&key, &iv, &unhex(SP800_38A_CBC_AES256_CIPHERTEXT)).unwrap();
    assert_eq!(pt.expose_secret(), unhex(SP800_38A_PLAINTEXT).as_slice());
}

#[test]
fn raw_cbc_refuses_partial_blocks() {
    let (key, iv) = sp800_38a_key_iv();
    assert!(hazmat::cbc_encrypt_no_padding(&key, &iv, &[0; 15]).is_err());
    assert!(hazmat::cbc_decrypt_no_padding(&key, &iv, &[0; 17]).is_err());
}

// ---------------------------------------------------------------------------
// Keyring properties

fn version_key(version: u32) -> SecretBytes {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&version.to_be_bytes());
    key[31] = 0xa5;
    SecretBytes::from_slice(&key)
}

/// A keyring holding versions `1..=n`.
fn keyring(n: u32, min_decrypt_version: u32) -> Keyring {
    let mut ring = Keyring::new(min_decrypt_version);
    for v in 1..=n {
        ring.insert(v, version_key(v)).unwrap();
    }
    ring
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn envelope_round_trip(
        tenant in text(), id in text(), cred_version in any::<u32>(), plaintext in bytes(300),
    ) {
        let ring = keyring(3, 1);
        let sealed = ring.seal(&tenant, &id, cred_version, &plaintext).unwrap();
        prop_assert_eq!(ring.sealed_key_version(&sealed).unwrap(), 3);
        prop_assert_eq!(&sealed[..2], b"RV");
        let opened = ring.open(&tenant, &id, cred_version, &sealed).unwrap();
        prop_assert_eq!(opened.expose_secret(), plaintext.as_slice());
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        plaintext in bytes(80), bit_seed in any::<usize>(),
    ) {
        let ring = keyring(2, 1);
        let sealed = ring.seal("tenant", "cred", 7, &plaintext).unwrap();
        let bit = bit_seed % (sealed.len() * 8);
        let mut tampered = sealed.clone();
        tampered[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ring.open("tenant", "cred", 7, &tampered).is_err(), "bit {} accepted", bit);
        prop_assert!(ring.rewrap("tenant", "cred", 7, &tampered).map(|o| o.is_none()).unwrap_or(true));
    }

    #[test]
    fn every_header_bit_flip_is_rejected(plaintext in bytes(40)) {
        let ring = keyring(2, 1);
        let sealed = ring.seal("t", "c", 1, &plaintext).unwrap();
        for bit in 0..crypto::HEADER_LEN * 8 {
            let mut tampered = sealed.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ring.open("t", "c", 1, &tampered).is_err(), "header bit {} accepted", bit);
        }
    }

    #[test]
    fn changed_record_fields_are_rejected(
        tenant in text(), other_tenant in text(),
        id in text(), other_id in text(),
        cred_version in any::<u32>(), other_version in any::<u32>(),
        plaintext in bytes(64),
    ) {
        let ring = keyring(1, 1);
        let sealed = ring.seal(&tenant, &id, cred_version, &plaintext).unwrap();
        if other_tenant != tenant {
            prop_assert!(ring.open(&other_tenant, &id, cred_version, &sealed).is_err());
        }
        if other_id != id {
            prop_assert!(ring.open(&tenant, &other_id, cred_version, &sealed).is_err());
        }
        if other_version != cred_version {
            prop_assert!(ring.open(&tenant, &id, other_version, &sealed).is_err());
        }
        // Swapping tenant and credential id must not collide either.
        if tenant != id {
            prop_assert!(ring.open(&id, &tenant, cred_version, &sealed).is_err());
        }
        // Moving the boundary between the two strings must not collide.
        let joined = format!("{tenant}{id}");
        if !tenant.is_empty() && !id.is_empty() {
            prop_assert!(ring.open(&joined, "", cred_version, &sealed).is_err());
        }
    }

    #[test]
    fn versions_below_min_decrypt_are_rejected(
        plaintext in bytes(64), sealed_with in 1u32..=4, min in 1u32..=4,
    ) {
        let old = keyring(sealed_with, 1);
        let sealed = old.seal("t", "c", 1, &plaintext).unwrap();
        let ring = keyring(4, min);
        let result = ring.open("t", "c", 1, &sealed);
        if sealed_with < min {
            prop_assert!(result.is_err());
        } else {
            let opened = result.unwrap();
            prop_assert_eq!(opened.expose_secret(), plaintext.as_slice());
        }
    }

    #[test]
    fn rewrap_moves_to_current_version(
        tenant in text(), id in text(), cred_version in any::<u32>(),
        plaintext in bytes(200), sealed_with in 1u32..=3,
    ) {
        let sealed = keyring(sealed_with, 1).seal(&tenant, &id, cred_version, &plaintext).unwrap();
        let ring = keyring(3, 1);
        let rewrapped = ring.rewrap(&tenant, &id, cred_version, &sealed).unwrap();
        let current = match rewrapped {
            None => {
                prop_assert_eq!(sealed_with, 3);
                sealed.clone()
            }
            Some(new) => {
                prop_assert!(sealed_with < 3);
                prop_assert_ne!(&new, &sealed);
                new
            }
        };
        prop_assert_eq!(ring.sealed_key_version(&current).unwrap(), 3);
        let opened = ring.open(&tenant, &id, cred_version, &current).unwrap();
        prop_assert_eq!(opened.expose_secret(), plaintext.as_slice());
        prop_assert!(ring.rewrap(&tenant, &id, cred_version, &current).unwrap().is_none());
        // After retiring the old versions the rewrapped envelope still opens.
        let mut retired = keyring(3, 1);
        retired.set_min_decrypt_version(3);
        prop_assert!(retired.open(&tenant, &id, cred_version, &current).is_ok());
        // A rewrap does not relocate a record: another credential id still fails.
        let other = format!("{id}x");
        prop_assert!(ring.rewrap(&tenant, &other, cred_version, &sealed).map(|o| o.is_none()).unwrap_or(true));
    }
}

#[test]
fn unknown_key_version_is_rejected() {
    let sealed = keyring(3, 1).seal("t", "c", 1, b"pw").unwrap();
    let ring = keyring(2, 1);
    assert!(ring.open("t", "c", 1, &sealed).is_err());
    assert!(ring.rewrap("t", "c", 1, &sealed).is_err());
}
