// TTHeader streaming (Kitex v0.16.3 carries only Thrift over TTHeader
// streaming, not Protobuf): it stays on the server's usual (TCP) address
// beside kshm.
namespace go kshmtt

struct StreamRequest {
    1: binary payload
    2: string message
    3: i64 seq
}

struct StreamResponse {
    1: binary payload
    2: string message
    3: i64 seq
}

service TTStream {
    StreamResponse TTEchoBidi(1: StreamRequest req) (streaming.mode="bidirectional")
}
