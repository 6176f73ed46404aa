#include "models.h"
#include "llama-impl.h"

// MeKi (arXiv 2602.03359): a Qwen3-shaped decoder whose layers each mix one row of a
// token-indexed memory table into the residual stream, in a thin branch beside the FFN:
//
//   H  = ffn_norm(A)                              A: the residual after attention
//   v  = mem_l[token] * scale_l + sigmoid(W_gate . H)    scale_l: optional, [m]
//   y  = rms_norm(W_out . v) * post_norm
//   A' = FFN(H) + (y + A)
//
// The tables of all layers are one token-major matrix {n_mem * n_layer, n_vocab}, the layout
// of Gemma's per-layer embeddings: one token's memory is one contiguous read. It is read
// lazily from the mapped file and its rows are prefetched by token id. See docs/FORMAT.md.

void llama_model_meki::load_arch_hparams(llama_model_loader & ml) {
    ml.get_key(LLM_KV_ATTENTION_LAYERNORM_RMS_EPS, hparams.f_norm_rms_eps);
    ml.get_key(LLM_KV_EMBEDDING_LENGTH_PER_LAYER,  hparams.n_embd_per_layer);

    // meki-gguf 0.1 wrote this key; true marks a layer that no MeKi model has (a misreading of
    // Megatron-LM's layout), whose weights would run here silently wrong
    const int64_t legacy = gguf_find_key(ml.metadata, "meki.memory.gate_on_residual");
    if (legacy >= 0 && gguf_get_kv_type(ml.metadata, legacy) == GGUF_TYPE_BOOL && gguf_get_val_bool(ml.metadata, legacy)) {
        throw std::runtime_error("meki.memory.gate_on_residual = true: written by meki-gguf 0.1 from a misread "
                                 "Megatron-LM layout that no MeKi model has; convert the original checkpoint again");
    }

    // the graph takes one head size for keys, values and the rotation (the asserts in graph()): a
    // file that says otherwise is a load error, not an abort at the first decode
    if (hparams.n_embd_head_k() != hparams.n_embd_head_v() || hparams.n_rot() != hparams.n_embd_head_k()) {
        throw std::runtime_error(format("attention key length %u, value length %u and rope dimension %u must be equal",
                                        hparams.n_embd_head_k(), hparams.n_embd_head_v(), hparams.n_rot()));
    }

    switch (hparams.n_layer()) {
        case 28: type = hparams.n_embd == 1024 ? LLM_TYPE_0_6B : LLM_TYPE_1_7B; break;
        case 36: type = LLM_TYPE_4B; break;
        default: type = LLM_TYPE_UNKNOWN;
    }
}

void llama_model_meki::load_arch_tensors(llama_model_loader & ml) {
    LLAMA_LOAD_LOCALS;

    const int64_t n_mem = hparams.n_embd_per_layer;

    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);

    output_norm = create_tensor(tn(LLM_TENSOR_OUTPUT_NORM, "weight"), {n_embd}, 0);
    output      = create_tensor(tn(LLM_TENSOR_OUTPUT,      "weight"), {n_embd, n_vocab}, TENSOR_NOT_REQUIRED);
    if (output == NULL) {
        output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
    }

    // the table is what MeKi moves from RAM to storage: unless the user asked for it
    // resident (lazy mode off), read it lazily whatever its size. The user's setting decides, not
    // ml.lazy.mode: the loader turns AUTO off when a device cannot map the file (integrated GPUs,
    // the phone case), but the table is gathered on the host whatever the devices, and a lazy
    // context is mapped whatever the load mode
    if (params.lazy_mode == LLAMA_LAZY_MODE_AUTO) {
        ml.lazy.mode = LLAMA_LAZY_MODE_ON;
    }

    // a two-tier table (docs/FORMAT.md) keeps the rows of the frequent tokens in meki_mem, in a type
    // with more bits, and the others in meki_mem_cold: the first n_hot rows of the row order
    // (meki.memory.row_order, else the token ids) and the rest, each one contiguous read per token
    const std::string hot_name = tn(LLM_TENSOR_MEKI_MEM, "weight"), cold_name = tn(LLM_TENSOR_MEKI_MEM_COLD, "weight");
    const ggml_tensor * hot_meta = ml.get_tensor_meta(hot_name.c_str());
    const int64_t n_hot = hot_meta ? hot_meta->ne[1] : n_vocab;   // (no table: create_tensor says so)
    if (n_hot < 1 || n_hot > n_vocab) {
        throw std::runtime_error(format("%s has %lld rows for a vocabulary of %lld", hot_name.c_str(), (long long) n_hot, (long long) n_vocab));
    }
    if (n_hot < n_vocab && ml.get_tensor_meta(cold_name.c_str()) == nullptr) {
        throw std::runtime_error(format("%s has %lld rows for a vocabulary of %lld and there is no %s for the other %lld",
                                        hot_name.c_str(), (long long) n_hot, (long long) n_vocab, cold_name.c_str(), (long long) (n_vocab - n_hot)));
    }
    if (n_hot == n_vocab && ml.get_tensor_meta(cold_name.c_str()) != nullptr) {
        throw std::runtime_error(format("%s has a row for every token: %s has no rows left to hold", hot_name.c_str(), cold_name.c_str()));
    }
    per_layer_tok_embd = create_tensor(tn(LLM_TENSOR_MEKI_MEM, "weight"), {n_mem * n_layer, n_hot}, TENSOR_READ_LAZY);
    if (n_hot < n_vocab) {
        mem_cold = create_tensor(tn(LLM_TENSOR_MEKI_MEM_COLD, "weight"), {n_mem * n_layer, n_vocab - n_hot}, TENSOR_READ_LAZY);
    }

    // the row order: a permutation of the rows, so that the hot tier holds the frequent tokens where
    // token ids do not follow frequency; checked whole here, not at the first token that meets it
    const int64_t kid = gguf_find_key(ml.metadata, "meki.memory.row_order");
    if (kid >= 0) {
        const bool u32 = gguf_get_kv_type(ml.metadata, kid) == GGUF_TYPE_ARRAY &&
                         gguf_get_arr_type(ml.metadata, kid) == GGUF_TYPE_UINT32;
        if (!u32 || (int64_t) gguf_get_arr_n(ml.metadata, kid) != n_vocab) {
            throw std::runtime_error(format("meki.memory.row_order must be an array of %lld u32 rows, one per token", (long long) n_vocab));
        }
        const auto * rows = (const uint32_t *) gguf_get_arr_data(ml.metadata, kid);
        std::vector<bool> seen(n_vocab, false);
        mem_row.resize(n_vocab);
        for (int64_t t = 0; t < n_vocab; ++t) {
            if ((int64_t) rows[t] >= n_vocab || seen[rows[t]]) {
                throw std::runtime_error(format("meki.memory.row_order is not a permutation of the %lld rows: token %lld has row %u, %s",
                                                (long long) n_vocab, (long long) t, rows[t], (int64_t) rows[t] >= n_vocab ? "out of range" : "another token's"));
            }
            seen[rows[t]] = true;
            mem_row[t] = (int32_t) rows[t];
        }
    }

    for (int i = 0; i < n_layer; ++i) {
        auto & layer = layers[i];

        layer.attn_norm = create_tensor(tn(LLM_TENSOR_ATTN_NORM, "weight", i), {n_embd}, 0);

        create_tensor_qkv(layer, i, n_embd, n_embd_head_k * n_head, n_embd_gqa, n_embd_gqa, 0);
        layer.wo = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "weight", i), {n_embd_head_k * n_head, n_embd}, 0);

        // QK-norm is optional (the released MeKi script trains without it); both or neither
        layer.attn_q_norm = create_tensor(tn(LLM_TENSOR_ATTN_Q_NORM, "weight", i), {n_embd_head_k}, TENSOR_NOT_REQUIRED);
        layer.attn_k_norm = create_tensor(tn(LLM_TENSOR_ATTN_K_NORM, "weight", i), {n_embd_head_k}, layer.attn_q_norm ? 0 : TENSOR_NOT_REQUIRED);

        layer.ffn_norm = create_tensor(tn(LLM_TENSOR_FFN_NORM, "weight", i), {n_embd}, 0);
        layer.ffn_gate = create_tensor(tn(LLM_TENSOR_FFN_GATE, "weight", i), {n_embd,   n_ff}, 0);
        layer.ffn_down = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "weight", i), {  n_ff, n_embd}, 0);
        layer.ffn_up   = create_tensor(tn(LLM_TENSOR_FFN_UP,   "weight", i), {n_embd,   n_ff}, 0);

        // the memory branch has the shapes of Gemma's per-layer input branch: reuse its fields
        layer.per_layer_inp_gate  = create_tensor(tn(LLM_TENSOR_MEKI_GATE,      "weight", i), {n_embd, n_mem}, 0);
        layer.per_layer_proj      = create_tensor(tn(LLM_TENSOR_MEKI_OUT,       "weight", i), {n_mem, n_embd}, 0);
        layer.per_layer_post_norm = create_tensor(tn(LLM_TENSOR_MEKI_POST_NORM, "weight", i), {n_embd}, 0);

        // optional, every layer or none: the table holds each column divided by its scale (its RMS
        // over the vocabulary), which rounds better at low bits; the branch multiplies it back
        layer.per_layer_inp_scale = create_tensor(tn(LLM_TENSOR_MEKI_MEM_SCALE, "weight", i), {n_mem},
                                                  i == 0 || layers[0].per_layer_inp_scale == nullptr ? TENSOR_NOT_REQUIRED : 0);
        if (i > 0 && (layer.per_layer_inp_scale == nullptr) != (layers[0].per_layer_inp_scale == nullptr)) {
            throw std::runtime_error(format("%s: in layer %d but not in layer 0", tn(LLM_TENSOR_MEKI_MEM_SCALE, "weight", i).str().c_str(), i));
        }
    }

    // the norms and scales are multiplied into f32 activations, which the backends do only with f32
    // (ggml-cpu aborts on an f16 one): a file with another type is refused here, not at the first token
    auto require_f32 = [](const ggml_tensor * t) {
        if (t != nullptr && t->type != GGML_TYPE_F32) {
            throw std::runtime_error(format("tensor '%s' is %s: it must be f32", ggml_get_name(t), ggml_type_name(t->type)));
        }
    };
    require_f32(output_norm);
    for (const auto & layer : layers) {
        for (const ggml_tensor * t : {layer.attn_norm, layer.attn_q_norm, layer.attn_k_norm, layer.ffn_norm,
                                      layer.per_layer_post_norm, layer.per_layer_inp_scale}) {
            require_f32(t);
        }
    }
}

std::unique_ptr<llm_graph_context> llama_model_meki::build_arch_graph(const llm_graph_params & params) const {
    return std::make_unique<graph>(*this, params);
}

// prefetches the ubatch's table rows (madvise WILLNEED) before the graph gathers them
class llm_graph_input_meki_prefetch : public llm_graph_input_i {
public:
    llm_graph_input_meki_prefetch(const ggml_tensor * mem) : mem(mem) {}

    void set_input(const llama_ubatch * ubatch) override {
        llama_prefetch_rows(mem, ubatch->token, ubatch->n_tokens);
    }

    bool can_reuse(const llm_graph_params & params) override {
        return params.ubatch.token != nullptr;
    }

    const ggml_tensor * mem;
};

// a two-tier table or a stored row order: each token's row in the hot tier and in the cold one,
// and which of them it is in (1 or 0), from the token ids; the other tier's row is its row 0,
// gathered and multiplied by 0. Prefetches the rows the ubatch uses, in both tiers
class llm_graph_input_meki_rows : public llm_graph_input_i {
public:
    llm_graph_input_meki_rows(const llama_model_meki & model, bool prefetch) : model(model), prefetch(prefetch) {}

    void set_input(const llama_ubatch * ubatch) override {
        const int64_t n_hot = model.per_layer_tok_embd->ne[1];
        const uint32_t n = ubatch->n_tokens;
        std::vector<int32_t> hot(n), cold(n), hot_used, cold_used;
        std::vector<float> in_hot(n), in_cold(n);
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t t = ubatch->token[i];
            const int32_t r = model.mem_row.empty() ? t : model.mem_row[t];
            const bool is_hot = r < n_hot;
            hot[i]     = is_hot ? r : 0;
            cold[i]    = is_hot ? 0 : r - (int32_t) n_hot;
            in_hot[i]  = is_hot ? 1.0f : 0.0f;
            in_cold[i] = is_hot ? 0.0f : 1.0f;
            (is_hot ? hot_used : cold_used).push_back(is_hot ? hot[i] : cold[i]);
        }
        if (prefetch) {
            llama_prefetch_rows(model.per_layer_tok_embd, hot_used.data(), hot_used.size());
            llama_prefetch_rows(model.mem_cold, cold_used.data(), cold_used.size());
        }
        ggml_backend_tensor_set(rows_hot, hot.data(), 0, n * sizeof(int32_t));
        if (rows_cold) {
            ggml_backend_tensor_set(rows_cold, cold.data(), 0, n * sizeof(int32_t));
            ggml_backend_tensor_set(sel_hot,  in_hot.data(),  0, n * sizeof(float));
            ggml_backend_tensor_set(sel_cold, in_cold.data(), 0, n * sizeof(float));
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        return params.ubatch.token != nullptr && rows_hot->ne[0] == params.ubatch.n_tokens;
    }

    ggml_tensor * rows_hot  = nullptr;   // I32 [n_tokens]
    ggml_tensor * rows_cold = nullptr;   // I32 [n_tokens], two tiers only
    ggml_tensor * sel_hot   = nullptr;   // F32 [1, n_tokens], two tiers only
    ggml_tensor * sel_cold  = nullptr;   // F32 [1, n_tokens], two tiers only

    const llama_model_meki & model;
    const bool prefetch;
};

// one gather per ubatch: every layer's memory row of every token, returned layer-major,
// {n_mem, n_tokens, n_layer}
ggml_tensor * llama_model_meki::graph::build_inp_mem(const llama_model_meki & model) {
    if (!ubatch.token) {
        throw std::runtime_error("MeKi needs token ids: its memory table is indexed by token, not by embedding");
    }
    const bool prefetch = model.can_prefetch.count(model.per_layer_tok_embd) > 0;
    ggml_tensor * mem;
    if (model.mem_cold == nullptr && model.mem_row.empty()) {
        if (prefetch) {
            res->add_input(std::make_unique<llm_graph_input_meki_prefetch>(model.per_layer_tok_embd));
        }
        mem = ggml_get_rows(ctx0, model.per_layer_tok_embd, res->t_inp_tokens);
    } else {
        auto inp = std::make_unique<llm_graph_input_meki_rows>(model, prefetch);
        inp->rows_hot = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_tokens);
        ggml_set_input(inp->rows_hot);
        mem = ggml_get_rows(ctx0, model.per_layer_tok_embd, inp->rows_hot);
        if (model.mem_cold) {
            // a select as two multiplies and an add: each token's row times 1 plus the other tier's
            // row 0 times 0, exactly the row (a per-ubatch gather of n_tokens rows, on the host)
            inp->rows_cold = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_tokens);
            inp->sel_hot   = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, n_tokens);
            inp->sel_cold  = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, n_tokens);
            ggml_set_input(inp->rows_cold);
            ggml_set_input(inp->sel_hot);
            ggml_set_input(inp->sel_cold);
            ggml_tensor * cold = ggml_get_rows(ctx0, model.mem_cold, inp->rows_cold);
            mem = ggml_add(ctx0, ggml_mul(ctx0, mem, inp->sel_hot), ggml_mul(ctx0, cold, inp->sel_cold));
        }
        res->add_input(std::move(inp));
    }
    cb(mem, "meki_mem", -1);

    // the gather runs on the host, where the table is; with layers offloaded, the scheduler copies
    // each layer's slice to that layer's backend. Layer-major, a slice is contiguous and the copies
    // add up to the gathered rows; a strided slice of the token-major rows would be copied with
    // the rows of every other layer, once per layer
    const int64_t n_mem = hparams.n_embd_per_layer;
    mem = ggml_reshape_3d(ctx0, mem, n_mem, n_layer, n_tokens);
    mem = ggml_cont(ctx0, ggml_permute(ctx0, mem, 0, 2, 1, 3));
    cb(mem, "meki_mem_layers", -1);

    // gathered first, beside the input embedding: otherwise the graph reaches the host's gather from
    // layer 0's branch, between that layer's ops, and the scheduler splits the first device's
    // layers in two around it (a backend that caches its last graph, RPC's, re-sends both each step)
    ggml_build_forward_expand(gf, mem);
    return mem;
}

// y = rms_norm(W_out . (mem * scale + sigmoid(W_gate . h))) * post_norm, h = ffn_norm(A)
ggml_tensor * llama_model_meki::graph::build_mem_branch(const llama_layer & layer, ggml_tensor * h, ggml_tensor * mem, int il) {
    if (layer.per_layer_inp_scale) {
        mem = ggml_mul(ctx0, mem, layer.per_layer_inp_scale);
        cb(mem, "meki_mem_scaled", il);
    }

    ggml_tensor * gate = build_lora_mm(layer.per_layer_inp_gate, h);
    gate = ggml_sigmoid(ctx0, gate);
    cb(gate, "meki_gate", il);

    ggml_tensor * cur = ggml_add(ctx0, mem, gate);
    cur = build_lora_mm(layer.per_layer_proj, cur);
    cur = build_norm(cur, layer.per_layer_post_norm, NULL, LLM_NORM_RMS, il);
    cb(cur, "meki_out", il);
    return cur;
}

llama_model_meki::graph::graph(const llama_model_meki & model, const llm_graph_params & params) : llm_graph_context(params) {
    const int64_t n_embd_head = hparams.n_embd_head_v();
    const int64_t n_mem       = hparams.n_embd_per_layer;

    GGML_ASSERT(n_embd_head == hparams.n_embd_head_k());
    GGML_ASSERT(n_embd_head == n_rot);

    ggml_tensor * cur;
    ggml_tensor * inpL = build_inp_embd(model.tok_embd);
    ggml_tensor * mem  = build_inp_mem(model);

    ggml_tensor * inp_pos     = build_inp_pos();
    auto        * inp_attn    = build_attn_inp_kv();
    ggml_tensor * inp_out_ids = build_inp_out_ids();

    for (int il = 0; il < n_layer; ++il) {
        const auto & layer = model.layers[il];

        res->t_layer_inp[il] = inpL;

        ggml_tensor * inpSA = inpL;

        cur = build_norm(inpL, layer.attn_norm, NULL, LLM_NORM_RMS, il);
        cb(cur, "attn_norm", il);

        // self-attention
        {
            auto [Qcur, Kcur, Vcur] = build_qkv(layer, cur, n_embd_head, n_head, n_head_kv, il);

            if (layer.attn_q_norm) {
                Qcur = build_norm(Qcur, layer.attn_q_norm, NULL, LLM_NORM_RMS, il);
                Kcur = build_norm(Kcur, layer.attn_k_norm, NULL, LLM_NORM_RMS, il);
                cb(Qcur, "Qcur_normed", il);
                cb(Kcur, "Kcur_normed", il);
            }

            Qcur = ggml_rope_ext(ctx0, Qcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow);
            Kcur = ggml_rope_ext(ctx0, Kcur, inp_pos, nullptr,
                    n_rot, rope_type, n_ctx_orig, freq_base, freq_scale,
                    ext_factor, attn_factor, beta_fast, beta_slow);

            cb(Qcur, "Qcur", il);
            cb(Kcur, "Kcur", il);
            cb(Vcur, "Vcur", il);

            cur = build_attn(inp_attn,
                    layer.wo, layer.wo_b, layer.wo_s,
                    Qcur, Kcur, Vcur, nullptr, nullptr, nullptr, 1.0f/sqrtf(float(n_embd_head)), il);
        }

        // this layer's slice of the gathered memory rows
        ggml_tensor * mem_l = ggml_view_2d(ctx0, mem, n_mem, n_tokens, mem->nb[1], il*mem->nb[2]);

        if (il == n_layer - 1 && inp_out_ids) {
            cur   = ggml_get_rows(ctx0,   cur, inp_out_ids);
            inpSA = ggml_get_rows(ctx0, inpSA, inp_out_ids);
            mem_l = ggml_get_rows(ctx0, mem_l, inp_out_ids);
        }

        ggml_tensor * ffn_inp = ggml_add(ctx0, cur, inpSA);
        cb(ffn_inp, "ffn_inp", il);

        ggml_tensor * ffn_normed = build_norm(ffn_inp, layer.ffn_norm, NULL, LLM_NORM_RMS, il);
        cb(ffn_normed, "ffn_norm", il);

        // the memory branch, parallel to the FFN: its gate reads the FFN's input too. It is added
        // to the residual first (its output norm, mul and this add are one fused kernel on CUDA
        // and Vulkan) and put in the graph before the FFN, so that the FFN's down projection is
        // followed by its residual add, as in a dense layer: GPU backends fuse that add into the
        // matrix-vector product. Otherwise the branch costs one more kernel per layer in decoding
        ggml_tensor * y = build_mem_branch(layer, ffn_normed, mem_l, il);
        ggml_tensor * ffn_res = ggml_add(ctx0, y, ffn_inp);
        cb(ffn_res, "meki_res", il);
        ggml_build_forward_expand(gf, ffn_res);

        cur = build_ffn(ffn_normed,
                layer.ffn_up,   NULL, layer.ffn_up_s,
                layer.ffn_gate, NULL, layer.ffn_gate_s,
                layer.ffn_down, NULL, layer.ffn_down_s,
                NULL,
                LLM_FFN_SILU, LLM_FFN_PAR, il);
        cb(cur, "ffn_out", il);

        cur = ggml_add(ctx0, cur, ffn_res);

        cur = build_cvec(cur, il);
        cb(cur, "l_out", il);

        inpL = cur;
    }
    cur = inpL;

    cur = build_norm(cur, model.output_norm, NULL, LLM_NORM_RMS, -1);

    cb(cur, "result_norm", -1);
    res->t_embd = cur;

    cur = build_lora_mm(model.output, cur, model.output_s);

    cb(cur, "result_output", -1);
    res->t_logits = cur;

    ggml_build_forward_expand(gf, cur);
}
