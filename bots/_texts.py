"""Everything the bots say, in English and Brazilian Portuguese.

One dictionary per language, one key per sentence. The language is chosen from
the person's client language (`pt*` → Portuguese), English by default.
"""

from __future__ import annotations

from bots._messages import Sender

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "welcome": (
            "🚗 Send me a photo of a car and I'll tell you the three most likely models "
            "(I know {models} of them), with how sure I am.\n\n"
            "Then tell me with 👍 or 👎 whether I was right: a 👎 lets you pick the right model, "
            "and your answers teach the next version of me.\n\n"
            "In a group, send a photo with the caption /top3, or reply /top3 to a photo. "
            "/top3 alone looks at the last photo I saw in the chat.\n\n"
            "What I keep: your photos (for {retention} days, to learn from), my answers and your votes. "
            "/forget deletes all of it."
        ),
        "header_sure": "🚗 I think this is:",
        "header_unsure": "🤔 I'm not sure, but my best guesses are:",
        "header_unfamiliar": "🤷 This doesn't look like a car model I know. In case it is one, my closest guesses are:",
        "footer": "model {version} · was I right?",
        "footer_unrecorded": "model {version} · (I can't take votes on this answer right now)",
        "store_unavailable": "💾 I can't save that right now; please try again in a minute.",
        "rate_limited": "⏳ That's a lot of photos! I answer up to {per_minute} a minute per person; try again shortly.",
        "photo_rejected": "🖼️ I can't use this picture: {reason}",
        "reject_empty": "the file is empty; please send the picture again.",
        "reject_too_large": "the file is larger than {limit_mb} MB; please send a smaller picture.",
        "reject_not_an_image": "this file is not a picture I can read (JPEG, PNG, WebP, GIF, BMP, TIFF).",
        "reject_truncated": "this picture is incomplete or damaged; please send it again.",
        "reject_too_many_pixels": "this picture has too many pixels; please send a smaller one.",
        "reject_unsupported": "this picture uses a format or colour mode I cannot read; please send a JPEG or PNG.",
        "reject_unreadable": "this picture could not be read; please send it as a JPEG or PNG.",
        "reject_expired": "the photo expired before I could look at it; please send it again.",
        "reject_quarantined": "this picture stopped the classifier twice, so it was set aside; please send a different photo.",
        "photo_too_large": "🖼️ That file is too big for me (over {limit_mb} MB); please send it as a photo, not a file.",
        "busy": "🚦 I'm very busy right now; please try again in a minute.",
        "timeout": "⌛ That took too long, sorry; please try again in a minute.",
        "failed": "⚠️ Something went wrong on my side; please try again later.",
        "no_photo_yet": "📷 I haven't seen a photo in this chat yet: send one, or reply /top3 to a photo.",
        "thanks_up": "👍 Thanks!",
        "thanks_down": "👎 Thanks! Which model was it?",
        "vote_unchanged": "Already recorded, thanks.",
        "stale": "This button is no longer valid.",
        "which_model": "Which model was it?",
        "another_model": "Another model…",
        "type_model": "✏️ Type the make and model (for example {example}).",
        "did_you_mean": "Did you mean one of these?",
        "none_of_these": "✏️ None of these",
        "no_match": "🤷 I don't know a model called “{typed}”. I know {models} models; try make and model, e.g. {example}.",
        "corrected": "✅ Thanks! Recorded as {label}.",
        "forgotten": "🗑️ Done: I deleted {predictions} answers, {votes} votes and {photos} photos of yours.",
        "not_admin": "Sorry, that command is for the bot's admins.",
        "takes_no_argument": "/{command} takes nothing after it, so I did nothing. Send /{command} alone.",
        "stats": (
            "📊 {predictions} answers to {people} people · 👍 {up} · 👎 {down} · {corrections} corrections"
            " · accuracy by feedback {accuracy}"
        ),
        "stats_model": "  {version}: {predictions} answers · 👍 {up} · 👎 {down} · accuracy {accuracy}",
        "model_info": "🧠 Active model {version} ({backbone}, {size} px, {labels} models), created {created}.{metrics}",
        "no_model": "No model is active yet.",
        "retrain_unavailable": "🛠️ This bot cannot start retrains (it has no connection to the train queue).",
        "retrain_running": "⏳ A retrain is already running (run #{run}); one at a time.",
        "retrain_starting": "⏳ Another admin is starting a retrain right now; one at a time.",
        "retrain_queued": "🛠️ Retrain #{run} queued: I'll keep this message up to date while it trains.",
        "retrain_no_worker": "No train worker is running right now: the run starts when `carbot train-worker` serves the “{queue}” queue.",
        "retrain_started": "🛠️ Retrain #{run} started: gathering the photos…",
        "retrain_progress_title": "🛠️ Retrain #{run} is training:",
        "retrain_progress": "epoch {epoch}/{epochs} · loss {loss:.3f} · accuracy {accuracy} · about {left} min left",
        "retrain_failed": "❌ Retrain #{run} failed: {error}. The active model keeps serving.",
        "retrain_done": "✅ Retrain #{run} finished in {minutes} min.",
        "summary_promoted": "✅ Retrain #{run}: the new model {candidate} is active now (it replaced {base}); the workers switch to it between batches.",
        "summary_rejected": "🚫 Retrain #{run}: the candidate {candidate} was not promoted: {reason}. {base} stays active.",
        "summary_nothing": "🚫 Retrain #{run} trained nothing: {reason}. {base} stays active; people's 👍 and corrections are what it learns from.",
        "summary_data": "Trained on {base_train} base photos and {feedback_train} feedback photos (each seen ×{oversample}); judged on {base_holdout} base and {feedback_holdout} held-out feedback photos; {feedback_skipped} feedback photos could not be used.",
        "summary_metrics_head": "Hold-out accuracy, {base} → {candidate}:",
        "summary_overall": "  overall ({n} photos): {active} → {candidate}",
        "summary_base": "  base test photos ({n}): {active} → {candidate}",
        "summary_feedback": "  held-out feedback ({n}): {active} → {candidate}",
        "reason_better": "it is better",
        "reason_worse_overall": "it is worse overall on the hold-out",
        "reason_not_better_on_feedback": "it is not better on the held-out feedback photos",
        "reason_no_feedback_holdout": "no feedback photos are held out yet to judge it on (it needs more 👍/👎 first)",
        "reason_no_training_data": "there were no usable photos to train on",
        "reason_worse_on_a_class": "it is worse than the active model on one class of the hold-out (or more)",
        "reason_chance_on_a_class": "it is no better than chance on one class of the hold-out (or more)",
        "button_promote": "Promote anyway",
        "button_discard": "Discard",
        "promoted_by_admin": "✅ {version} is active now (run #{run}, promoted by an admin).",
        "discarded": "🗑️ The candidate {version} of run #{run} was discarded.",
        "run_not_waiting": "That candidate is no longer waiting for a decision.",
        "decision_queued": "⏳ Decision recorded for run #{run}; the train worker carries it out when it is free "
        "(I'll say when it is done).",
        "rollback_done": "↩️ Rolled back: {version} is active again (it was {was}); the workers switch between batches.",
        "rollback_none": "There is no previous model to roll back to.",
        "rollback_busy": "⏳ The train worker is busy or not running, so nothing was rolled back; try again later.",
        "hint_sticker": "Nice sticker! 😄 Send me a photo of a car and I'll name the model.",
        "hint_video": "I can only look at photos, not videos: send a still photo of the car.",
        "hint_voice": "I can't listen, sorry 🙉 Send me a photo of a car.",
        "hint_animation": "I can only look at still photos: send a photo of the car.",
        "hint_document": "That file isn't a picture I can read: send a JPEG, PNG or WebP photo of a car.",
        "hint_text": "Send me a photo of a car and I'll tell you the model. /help explains more.",
        "hint_other": "Send me a photo of a car and I'll tell you the model.",
        "button_up": "👍",
        "button_down": "👎",
    },
    "pt": {
        "welcome": (
            "🚗 Mande uma foto de um carro e eu digo os três modelos mais prováveis "
            "(conheço {models}), com o quanto tenho certeza.\n\n"
            "Depois me diga com 👍 ou 👎 se acertei: com 👎 você escolhe o modelo certo, "
            "e suas respostas ensinam a próxima versão.\n\n"
            "Em grupos, mande a foto com a legenda /top3 ou responda /top3 a uma foto. "
            "/top3 sozinho usa a última foto que vi no chat.\n\n"
            "O que eu guardo: suas fotos (por {retention} dias, para aprender), minhas respostas e seus votos. "
            "/forget apaga tudo isso."
        ),
        "header_sure": "🚗 Acho que é:",
        "header_unsure": "🤔 Não tenho certeza, mas meus palpites são:",
        "header_unfamiliar": "🤷 Isso não parece um modelo de carro que eu conheça. Caso seja, meus palpites mais próximos são:",
        "footer": "modelo {version} · acertei?",
        "footer_unrecorded": "modelo {version} · (não consigo receber votos sobre esta resposta agora)",
        "store_unavailable": "💾 Não consigo salvar isso agora; tente de novo em um minuto.",
        "rate_limited": "⏳ Quantas fotos! Respondo até {per_minute} por minuto por pessoa; tente de novo daqui a pouco.",
        "photo_rejected": "🖼️ Não consigo usar esta imagem: {reason}",
        "reject_empty": "o arquivo está vazio; mande a imagem de novo.",
        "reject_too_large": "o arquivo tem mais de {limit_mb} MB; mande uma imagem menor.",
        "reject_not_an_image": "este arquivo não é uma imagem que eu consiga ler (JPEG, PNG, WebP, GIF, BMP, TIFF).",
        "reject_truncated": "esta imagem está incompleta ou danificada; mande de novo.",
        "reject_too_many_pixels": "esta imagem tem pixels demais; mande uma menor.",
        "reject_unsupported": "esta imagem usa um formato ou modo de cor que não consigo ler; mande um JPEG ou PNG.",
        "reject_unreadable": "não consegui ler esta imagem; mande como JPEG ou PNG.",
        "reject_expired": "a foto expirou antes que eu pudesse olhá-la; mande de novo.",
        "reject_quarantined": "esta imagem travou o classificador duas vezes e foi deixada de lado; mande outra foto.",
        "photo_too_large": "🖼️ Esse arquivo é grande demais para mim (mais de {limit_mb} MB); mande como foto, não como arquivo.",
        "busy": "🚦 Estou muito ocupado agora; tente de novo em um minuto.",
        "timeout": "⌛ Demorou demais, desculpe; tente de novo em um minuto.",
        "failed": "⚠️ Algo deu errado do meu lado; tente mais tarde.",
        "no_photo_yet": "📷 Ainda não vi nenhuma foto neste chat: mande uma ou responda /top3 a uma foto.",
        "thanks_up": "👍 Obrigado!",
        "thanks_down": "👎 Obrigado! Qual era o modelo?",
        "vote_unchanged": "Já registrado, obrigado.",
        "stale": "Este botão não vale mais.",
        "which_model": "Qual era o modelo?",
        "another_model": "Outro modelo…",
        "type_model": "✏️ Digite a marca e o modelo (por exemplo {example}).",
        "did_you_mean": "Você quis dizer um destes?",
        "none_of_these": "✏️ Nenhum destes",
        "no_match": "🤷 Não conheço um modelo chamado “{typed}”. Conheço {models}; tente marca e modelo, ex.: {example}.",
        "corrected": "✅ Obrigado! Registrado como {label}.",
        "forgotten": "🗑️ Pronto: apaguei {predictions} respostas, {votes} votos e {photos} fotos suas.",
        "not_admin": "Desculpe, esse comando é para os administradores do bot.",
        "takes_no_argument": "/{command} não leva nada depois, então não fiz nada. Mande só /{command}.",
        "stats": (
            "📊 {predictions} respostas para {people} pessoas · 👍 {up} · 👎 {down} · {corrections} correções"
            " · acerto pelos votos {accuracy}"
        ),
        "stats_model": "  {version}: {predictions} respostas · 👍 {up} · 👎 {down} · acerto {accuracy}",
        "model_info": "🧠 Modelo ativo {version} ({backbone}, {size} px, {labels} modelos), criado em {created}.{metrics}",
        "no_model": "Nenhum modelo está ativo ainda.",
        "retrain_unavailable": "🛠️ Este bot não consegue iniciar retreinos (não tem conexão com a fila de treino).",
        "retrain_running": "⏳ Já há um retreino em andamento (execução #{run}); um de cada vez.",
        "retrain_starting": "⏳ Outro administrador está iniciando um retreino agora; um de cada vez.",
        "retrain_queued": "🛠️ Retreino #{run} na fila: vou manter esta mensagem atualizada durante o treino.",
        "retrain_no_worker": "Nenhum worker de treino está rodando agora: a execução começa quando `carbot train-worker` atender a fila “{queue}”.",
        "retrain_started": "🛠️ Retreino #{run} começou: reunindo as fotos…",
        "retrain_progress_title": "🛠️ Retreino #{run} treinando:",
        "retrain_progress": "época {epoch}/{epochs} · perda {loss:.3f} · acurácia {accuracy} · faltam uns {left} min",
        "retrain_failed": "❌ O retreino #{run} falhou: {error}. O modelo ativo continua servindo.",
        "retrain_done": "✅ Retreino #{run} concluído em {minutes} min.",
        "summary_promoted": "✅ Retreino #{run}: o novo modelo {candidate} está ativo agora (substituiu {base}); os workers passam a usá-lo entre lotes.",
        "summary_rejected": "🚫 Retreino #{run}: o candidato {candidate} não foi promovido: {reason}. {base} continua ativo.",
        "summary_nothing": "🚫 O retreino #{run} não treinou nada: {reason}. {base} continua ativo; ele aprende com os 👍 e as correções das pessoas.",
        "summary_data": "Treinado com {base_train} fotos da base e {feedback_train} fotos dos votos (cada uma vista ×{oversample}); avaliado em {base_holdout} fotos da base e {feedback_holdout} fotos dos votos reservadas; {feedback_skipped} fotos dos votos não puderam ser usadas.",
        "summary_metrics_head": "Acurácia na reserva, {base} → {candidate}:",
        "summary_overall": "  geral ({n} fotos): {active} → {candidate}",
        "summary_base": "  fotos de teste da base ({n}): {active} → {candidate}",
        "summary_feedback": "  votos reservados ({n}): {active} → {candidate}",
        "reason_better": "ele é melhor",
        "reason_worse_overall": "ele é pior no geral na reserva",
        "reason_not_better_on_feedback": "ele não é melhor nas fotos dos votos reservadas",
        "reason_no_feedback_holdout": "ainda não há fotos dos votos reservadas para avaliá-lo (faltam mais 👍/👎)",
        "reason_no_training_data": "não havia fotos utilizáveis para treinar",
        "reason_worse_on_a_class": "ele é pior que o modelo ativo em uma classe da reserva (ou mais)",
        "reason_chance_on_a_class": "ele não é melhor que o acaso em uma classe da reserva (ou mais)",
        "button_promote": "Promover mesmo assim",
        "button_discard": "Descartar",
        "promoted_by_admin": "✅ {version} está ativo agora (execução #{run}, promovido por um administrador).",
        "discarded": "🗑️ O candidato {version} da execução #{run} foi descartado.",
        "run_not_waiting": "Esse candidato não está mais esperando uma decisão.",
        "decision_queued": "⏳ Decisão registrada para a execução #{run}; o worker de treino a executa quando estiver "
        "livre (eu aviso quando terminar).",
        "rollback_done": "↩️ Revertido: {version} está ativo de novo (era {was}); os workers trocam entre lotes.",
        "rollback_none": "Não há modelo anterior para reverter.",
        "rollback_busy": "⏳ O worker de treino está ocupado ou parado, então nada foi revertido; tente mais tarde.",
        "hint_sticker": "Belo sticker! 😄 Mande uma foto de um carro e eu digo o modelo.",
        "hint_video": "Só consigo ver fotos, não vídeos: mande uma foto do carro.",
        "hint_voice": "Não consigo ouvir, desculpe 🙉 Mande uma foto de um carro.",
        "hint_animation": "Só consigo ver fotos paradas: mande uma foto do carro.",
        "hint_document": "Esse arquivo não é uma imagem que eu consiga ler: mande uma foto JPEG, PNG ou WebP.",
        "hint_text": "Mande uma foto de um carro e eu digo o modelo. /help explica mais.",
        "hint_other": "Mande uma foto de um carro e eu digo o modelo.",
        "button_up": "👍",
        "button_down": "👎",
    },
}


def language_for(code: str | None) -> str | None:
    """The bots' language for a client's language code ("pt-BR" -> "pt"); None when the client said none.

    The one rule for choosing a language: `language_of` answers in it, the store keeps it for a person.
    """
    if not code:
        return None
    return "pt" if code.lower().startswith("pt") else "en"


def language_of(sender: Sender) -> str:
    """The language to answer `sender` in: Portuguese for `pt*` clients, English otherwise."""
    return language_for(sender.language_code) or "en"


def text(key: str, language: str, **values: object) -> str:
    """The sentence `key` in `language`, with `values` filled in."""
    return TEXTS.get(language, TEXTS["en"])[key].format(**values)
