//! An attacker's PKCS#11 probe for the custody tests (tests/tests/custody.rs):
//! what someone who holds the user PIN can do to the token directly, past
//! the daemon. It talks to the real module (SoftHSM2 in the tests) through
//! cryptoki; each run is its own process, because a module reads its
//! configuration (`SOFTHSM2_CONF`) once per process.
//!
//! ```text
//! p11probe MODULE TOKEN_LABEL PIN_FILE plant LABEL        a key imported by value (C_CreateObject)
//! p11probe MODULE TOKEN_LABEL PIN_FILE generate LABEL HEX_ID   a key generated in the token
//! p11probe MODULE TOKEN_LABEL PIN_FILE destroy LABEL
//! p11probe MODULE TOKEN_LABEL PIN_FILE id LABEL          prints CKA_ID in hex
//! p11probe MODULE TOKEN_LABEL PIN_FILE extract MK_LABEL WRAPPED_B64
//! ```
//! `extract` tries every way the probe knows to get a stored KEK out of the
//! token in plaintext, and prints one line per attempt: `NAME: refused
//! (REASON)` or `NAME: SUCCEEDED ...`.

use base64::Engine;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: p11probe MODULE TOKEN_LABEL PIN_FILE COMMAND ARGS...");
        std::process::exit(2);
    }
    let pkcs11 = Pkcs11::new(&args[1]).expect("load module");
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).map(|i| i.label().trim_end() == args[2]).unwrap_or(false))
        .expect("token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    let pin = std::fs::read_to_string(&args[3]).expect("pin file");
    session.login(UserType::User, Some(&AuthPin::new(pin.trim().into()))).expect("login");
    match args[4].as_str() {
        "plant" => {
            session.create_object(&secret_key_by_value(&args[5])).expect("C_CreateObject");
            println!("planted {}", args[5]);
        }
        "generate" => {
            let id = hex_decode(&args[6]);
            session.generate_key(&Mechanism::AesKeyGen, &generated_key(&args[5], id)).expect("C_GenerateKey");
            println!("generated {}", args[5]);
        }
        "destroy" => {
            for h in find(&session, &args[5]) {
                session.destroy_object(h).expect("C_DestroyObject");
            }
            println!("destroyed {}", args[5]);
        }
        "id" => {
            let h = one(&session, &args[5]);
            let attrs = session.get_attributes(h, &[AttributeType::Id]).expect("CKA_ID");
            let id = attrs.into_iter().find_map(|a| if let Attribute::Id(v) = a { Some(v) } else { None });
            println!("{}", id.unwrap_or_default().iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        "extract" => {
            let wrapped = base64::engine::general_purpose::STANDARD.decode(&args[6]).expect("base64");
            let kind = args.get(7).map_or("aes", String::as_str);
            extract(&session, one(&session, &args[5]), &wrapped, kind);
        }
        other => panic!("unknown command {other}"),
    }
}

fn find(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())]).expect("C_FindObjects")
}

fn one(session: &Session, label: &str) -> ObjectHandle {
    *find(session, label).first().unwrap_or_else(|| panic!("no object labelled {label}"))
}

/// An AES key whose value the attacker chose (32 × 0x41), with the
/// attributes a master key is checked for (sensitive, not extractable).
fn secret_key_by_value(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(vec![0x41; 32]),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ]
}

/// A key generated in the token, with every attribute a master key is
/// checked for, but no unwrap template.
fn generated_key(label: &str, id: Vec<u8>) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ]
}

fn aes(sensitive: bool, extractable: bool) -> Vec<Attribute> {
    secret(KeyType::AES, sensitive, extractable)
}

fn secret(key_type: KeyType, sensitive: bool, extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(extractable),
    ]
}

/// A stored version's kind: the template of the key it holds (an AES KEK,
/// an HMAC key, an EC private key), the mechanism that wrapped it, another
/// type to ask for, and the template the master key allows (the control).
struct Kind {
    base: fn(bool, bool) -> Vec<Attribute>,
    mechanism: Mechanism<'static>,
    other_mechanism: Mechanism<'static>,
    other_type: fn(bool, bool) -> Vec<Attribute>,
    confined: Vec<Attribute>,
}

fn kind(name: &str) -> Kind {
    let use_ = |v: Vec<Attribute>| {
        [vec![Attribute::Private(true), Attribute::Derive(false), Attribute::Unwrap(false)], v].concat()
    };
    match name {
        "aes" => Kind {
            base: aes,
            mechanism: Mechanism::AesKeyWrap,
            other_mechanism: Mechanism::AesKeyWrapPad,
            other_type: |s, e| secret(KeyType::GENERIC_SECRET, s, e),
            confined: [
                aes(true, false),
                use_(vec![Attribute::Wrap(false), Attribute::Encrypt(true), Attribute::Decrypt(true)]),
            ]
            .concat(),
        },
        "hmac" => Kind {
            base: |s, e| secret(KeyType::GENERIC_SECRET, s, e),
            mechanism: Mechanism::AesKeyWrap,
            other_mechanism: Mechanism::AesKeyWrapPad,
            other_type: aes,
            confined: [
                secret(KeyType::GENERIC_SECRET, true, false),
                use_(vec![
                    Attribute::Wrap(false),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                ]),
            ]
            .concat(),
        },
        "ec" => Kind {
            base: ec_private,
            mechanism: Mechanism::AesKeyWrapPad,
            other_mechanism: Mechanism::AesKeyWrap,
            other_type: |s, e| secret(KeyType::GENERIC_SECRET, s, e),
            confined: [ec_private(true, false), use_(vec![Attribute::Sign(true), Attribute::Decrypt(false)])]
                .concat(),
        },
        other => panic!("unknown kind {other}: aes, hmac or ec"),
    }
}

fn ec_private(sensitive: bool, extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(extractable),
    ]
}

fn report<T>(name: &str, r: Result<T, cryptoki::error::Error>, ok: impl FnOnce(T) -> String) {
    match r {
        Ok(v) => println!("{name}: SUCCEEDED {}", ok(v)),
        Err(e) => println!("{name}: refused ({e})"),
    }
}

fn value_of(session: &Session, h: ObjectHandle) -> String {
    match session.get_attributes(h, &[AttributeType::Value]) {
        Ok(a) if a.iter().any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())) => {
            "value readable".into()
        }
        Ok(_) => "value not returned".into(),
        Err(e) => format!("value refused ({e})"),
    }
}

fn extract(session: &Session, mk: ObjectHandle, wrapped: &[u8], kind_name: &str) {
    let k = kind(kind_name);
    let kw = &k.mechanism;
    let base = k.base;
    report("unwrap-plain", session.unwrap_key(kw, mk, wrapped, &base(false, true)), |h| value_of(session, h));
    report("unwrap-extractable", session.unwrap_key(kw, mk, wrapped, &base(true, true)), |_| {
        "extractable copy".into()
    });
    report(
        "unwrap-pad-plain",
        session.unwrap_key(&k.other_mechanism, mk, wrapped, &base(false, true)),
        |h| value_of(session, h),
    );
    report("unwrap-generic", session.unwrap_key(kw, mk, wrapped, &(k.other_type)(false, true)), |h| {
        value_of(session, h)
    });
    let mut derivable = base(true, false);
    derivable.push(Attribute::Derive(true));
    report("unwrap-derivable", session.unwrap_key(kw, mk, wrapped, &derivable), |_| {
        "a copy that derives (CKM_CONCATENATE_BASE_AND_DATA would copy its bits where the token has it)"
            .into()
    });
    let mut as_token = base(true, true);
    as_token[2] = Attribute::Token(true);
    report("unwrap-token-object", session.unwrap_key(kw, mk, wrapped, &as_token), |_| "token copy".into());
    report("decrypt-with-master-key", session.decrypt(&Mechanism::AesEcb, mk, wrapped), |_| {
        "decrypted".into()
    });
    // The template the master key allows: the control (this must work, or
    // the refusals above prove nothing), then what a confined copy allows.
    let kek = match session.unwrap_key(kw, mk, wrapped, &k.confined) {
        Ok(h) => {
            println!("control-confined-unwrap: ok");
            h
        }
        Err(e) => {
            println!("control-confined-unwrap: failed ({e})");
            return;
        }
    };
    let mine = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Token(false),
            Attribute::Wrap(true),
        ])
        .expect("a wrapping key of the attacker's");
    report("wrap-under-own-key", session.wrap_key(&Mechanism::AesKeyWrapPad, mine, kek), |_| {
        "wrapped under a known key".into()
    });
    report("wrap-under-own-key-kw", session.wrap_key(&Mechanism::AesKeyWrap, mine, kek), |_| {
        "wrapped under a known key".into()
    });
    report("set-extractable", session.update_attributes(kek, &[Attribute::Extractable(true)]), |_| {
        "now extractable".into()
    });
    report("set-not-sensitive", session.update_attributes(kek, &[Attribute::Sensitive(false)]), |_| {
        "now readable".into()
    });
    report("copy-extractable", session.copy_object(kek, &[Attribute::Extractable(true)]), |_| {
        "extractable copy".into()
    });
    match value_of(session, kek) {
        v if v == "value readable" => println!("read-value: SUCCEEDED {v}"),
        v => println!("read-value: refused ({v})"),
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}
