from aiokafka import codec


def test_aiokafka_can_decode_what_the_sdk_and_other_producers_compress():
    # Without these codecs a compressed topic stalls the Faust worker instead of failing loudly.
    assert codec.has_lz4() and codec.has_zstd() and codec.has_snappy()
    payload = b'{"schema_version": 1}\n' * 100
    import cramjam

    assert codec.lz4_decode(bytes(cramjam.lz4.compress(payload))) == payload
    assert codec.zstd_decode(bytes(cramjam.zstd.compress(payload))) == payload
