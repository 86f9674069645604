// Echo service used by kshm's example, tests and benchmarks.
namespace go echo

struct EchoRequest {
    1: binary payload
    2: string message
    3: i64 seq
}

struct EchoResponse {
    1: binary payload
    2: string message
    3: i64 seq
    4: map<string, string> meta
}

exception EchoError {
    1: i32 code
    2: string message
}

service EchoService {
    EchoResponse Echo(1: EchoRequest req)
    EchoResponse EchoOrFail(1: EchoRequest req) throws (1: EchoError err)
    EchoResponse Sleep(1: EchoRequest req, 2: i64 millis)
    oneway void Notify(1: EchoRequest req)
}

service MathService {
    i64 Add(1: i64 a, 2: i64 b)
}
