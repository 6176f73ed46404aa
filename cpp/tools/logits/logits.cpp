// llama-logits: the raw logits of a prompt and of its greedy continuation, for parity checks
// across builds (a cross-compiled build under an emulator, a GPU backend) without Python.
//
//   llama-logits -m MODEL -p 1,2,3 -n 32 -o logits.f32 [-f 4,5,...] [-b 64] [-ub 16] [-c 256] [-ngl 0] [-t N]
//                [--rpc HOST:PORT,...] [--dump NAME:FILE] [--no-repack]
//
// The prompt (token ids) goes through one llama_decode call, split into ubatches of -ub; then
// -n greedy tokens are chosen, each but the last fed back as a 1-token decode step (with -f, the
// n - 1 given tokens are fed instead, so that two builds evaluate the same sequence). logits.f32
// holds the float32 logits of every evaluated position, row-major [n_prompt + n - 1, n_vocab];
// stdout gets one line "greedy: t1 t2 ...". The KV cache is f32 and flash attention is off, so
// the only rounding is the backend's own arithmetic. --rpc adds the rpc-server processes at those
// endpoints as devices (llama.cpp's RPC backend, as the other tools' --rpc does), for -ngl.
// --dump appends the float32 values of every graph tensor named NAME (or NAME-<layer>) to FILE,
// each time the graph computes it (the scheduler's eval callback): e.g. meki_mem, the gathered
// table rows {L*m, n_tokens} of each ubatch, to check the gather against an independent dequantization.
// --no-repack keeps the weights in the file's layout (llama.cpp's --no-repack): the CPU's plain
// kernels, not the repacked (or AMX) ones.

#include "ggml-backend.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void usage(const char * argv0) {
    fprintf(stderr, "usage: %s -m MODEL -p ID,ID,... -o OUT.f32 [-n 32] [-f ID,ID,...] [-b 64] [-ub 16] [-c 256] [-ngl 0] [-t 1]"
                    " [--rpc HOST:PORT,...] [--dump NAME:FILE] [--no-repack]\n", argv0);
    exit(2);
}

static std::vector<llama_token> parse_ids(const char * s, const char * argv0) {
    std::vector<llama_token> ids;
    while (*s) {
        char * end;
        ids.push_back((llama_token) strtol(s, &end, 10));
        if (end == s || (*end && *end != ',')) {
            usage(argv0);
        }
        s = *end ? end + 1 : end;
    }
    return ids;
}

// the RPC servers as devices, through the RPC backend's registry (it is built with GGML_RPC)
static bool add_rpc_servers(const std::string & servers) {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    auto add = rpc ? (ggml_backend_reg_t (*)(const char *)) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server")
                   : nullptr;
    if (add == nullptr) {
        fprintf(stderr, "error: --rpc: this build has no RPC backend (-DGGML_RPC=ON)\n");
        return false;
    }
    for (size_t start = 0; start < servers.size();) {
        size_t end = servers.find(',', start);
        end = end == std::string::npos ? servers.size() : end;
        ggml_backend_reg_t reg = add(servers.substr(start, end - start).c_str());
        if (reg == nullptr) {
            fprintf(stderr, "error: --rpc: cannot add %s\n", servers.substr(start, end - start).c_str());
            return false;
        }
        ggml_backend_register(reg);
        start = end + 1;
    }
    return true;
}

struct dump_target {
    std::string name;
    FILE * out = nullptr;
    bool ok = true;
};

static bool dump_tensor(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * d = (dump_target *) user_data;
    const std::string name = ggml_get_name(t);
    const bool match = name == d->name || (name.rfind(d->name + "-", 0) == 0 && name.find('-', d->name.size() + 1) == std::string::npos);
    if (ask || !match) {
        return match;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        fprintf(stderr, "error: --dump %s: a %s tensor, not contiguous f32\n", name.c_str(), ggml_type_name(t->type));
        d->ok = false;
        return true;
    }
    std::vector<float> data(ggml_nelements(t));
    ggml_backend_tensor_get(t, data.data(), 0, ggml_nbytes(t));
    d->ok = d->ok && fwrite(data.data(), sizeof(float), data.size(), d->out) == data.size();
    return true;
}

int main(int argc, char ** argv) {
    std::string model_path, out_path, rpc_servers, dump;
    std::vector<llama_token> prompt, forced;
    int n_gen = 32, n_batch = 64, n_ubatch = 16, n_ctx = 256, n_gpu_layers = 0, n_threads = 1;
    bool repack = true;

    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--no-repack") {
            repack = false;
            continue;
        }
        if (i + 1 >= argc) {
            usage(argv[0]);
        }
        const char * val = argv[++i];
        if      (arg == "-m")   { model_path = val; }
        else if (arg == "-o")   { out_path = val; }
        else if (arg == "-n")   { n_gen = atoi(val); }
        else if (arg == "-b")   { n_batch = atoi(val); }
        else if (arg == "-ub")  { n_ubatch = atoi(val); }
        else if (arg == "-c")   { n_ctx = atoi(val); }
        else if (arg == "-ngl") { n_gpu_layers = atoi(val); }
        else if (arg == "-t")   { n_threads = atoi(val); }
        else if (arg == "-p")   { prompt = parse_ids(val, argv[0]); }
        else if (arg == "-f")   { forced = parse_ids(val, argv[0]); }
        else if (arg == "--rpc") { rpc_servers = val; }
        else if (arg == "--dump") { dump = val; }
        else                    { usage(argv[0]); }
    }
    if (model_path.empty() || out_path.empty() || prompt.empty() || n_gen < 1 ||
        (int) prompt.size() > n_batch || (int) prompt.size() + n_gen > n_ctx ||
        (!forced.empty() && (int) forced.size() != n_gen - 1)) {
        usage(argv[0]);
    }

    llama_backend_init();
    if (!rpc_servers.empty() && !add_rpc_servers(rpc_servers)) {
        return 1;
    }

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = n_gpu_layers;
    mparams.use_extra_bufts = repack;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (model == nullptr) {
        fprintf(stderr, "error: failed to load %s\n", model_path.c_str());
        return 1;
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = n_ctx;
    cparams.n_batch         = n_batch;
    cparams.n_ubatch        = n_ubatch;
    cparams.n_threads       = n_threads;
    cparams.n_threads_batch = n_threads;
    cparams.type_k          = GGML_TYPE_F32;
    cparams.type_v          = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    dump_target target;
    if (!dump.empty()) {
        const size_t colon = dump.find(':');
        if (colon == std::string::npos || colon == 0 || (target.out = fopen(dump.substr(colon + 1).c_str(), "wb")) == nullptr) {
            fprintf(stderr, "error: --dump %s: NAME:FILE, FILE writable\n", dump.c_str());
            return 1;
        }
        target.name = dump.substr(0, colon);
        cparams.cb_eval           = dump_tensor;
        cparams.cb_eval_user_data = &target;
    }
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        fprintf(stderr, "error: failed to create a context\n");
        return 1;
    }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(out_path.c_str(), "wb");
    if (out == nullptr) {
        fprintf(stderr, "error: cannot write %s\n", out_path.c_str());
        return 1;
    }

    // logits at every position of the prompt
    llama_batch batch = llama_batch_init((int32_t) prompt.size(), 0, 1);
    for (size_t i = 0; i < prompt.size(); ++i) {
        batch.token[i]     = prompt[i];
        batch.pos[i]       = (llama_pos) i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = true;
    }
    batch.n_tokens = (int32_t) prompt.size();

    std::vector<llama_token> greedy;
    int rc = 0;
    for (int step = 0; step < n_gen; ++step) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "error: llama_decode failed at step %d\n", step);
            rc = 1;
            break;
        }
        const float * last = nullptr;
        for (int i = 0; i < batch.n_tokens; ++i) {
            last = llama_get_logits_ith(ctx, i);
            fwrite(last, sizeof(float), n_vocab, out);
        }
        llama_token best = 0;
        for (int v = 1; v < n_vocab; ++v) {
            if (last[v] > last[best]) {
                best = v;
            }
        }
        greedy.push_back(best);

        // the next step: the chosen (or forced) token alone; nothing is evaluated after the last choice
        batch.token[0]  = forced.empty() || step == n_gen - 1 ? best : forced[step];
        batch.pos[0]    = (llama_pos) (prompt.size() + step);
        batch.logits[0] = true;
        batch.n_tokens  = 1;
    }
    fclose(out);
    if (target.out != nullptr && (fclose(target.out) != 0 || !target.ok)) {
        fprintf(stderr, "error: --dump %s: not written\n", dump.c_str());
        rc = 1;
    }

    printf("greedy:");
    for (llama_token t : greedy) {
        printf(" %d", t);
    }
    printf("\n");

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
